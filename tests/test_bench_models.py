"""The random-init helpers of :mod:`cam_engine.bench.models`, which the tests and the zoo scripts
use too: BatchNorm statistics of one batch, random rows for an all-zero classifier."""

from __future__ import annotations

import conftest
import torch
from conftest import images
from torch import nn
from torch.testing import assert_close

from cam_engine.bench.models import calibrate_batchnorm, randomise_zero_linears


def test_calibration_sets_the_statistics_of_one_batch_and_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    first, second = images(4, 16, seed=3), images(4, 16, seed=4)
    assert calibrate_batchnorm(model, first) is model
    assert calibrate_batchnorm(model, second) is model  # the first batch leaves no trace
    conv = model[0](second).detach()
    assert not model.training
    assert_close(model[1].running_mean, conv.mean((0, 2, 3)), rtol=0, atol=1e-14)
    assert_close(model[1].running_var, conv.var((0, 2, 3)), rtol=0, atol=1e-14)  # unbiased
    assert conftest.calibrate_bn is calibrate_batchnorm  # one implementation


def test_only_all_zero_linears_get_seeded_random_weights():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    nn.init.zeros_(model[1].weight)
    kept = model[0].weight.detach().clone()
    torch.manual_seed(5)
    assert randomise_zero_linears(model) is model
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(5)) * 0.02
    assert_close(model[1].weight.detach(), expected, rtol=1e-6, atol=0)  # float32 rounding
    assert torch.equal(model[0].weight, kept)
