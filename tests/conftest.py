"""Shared test helpers: random-init models made to behave like trained ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from cam_engine.bench.models import calibrate_batchnorm as calibrate_bn
from cam_engine.bench.models import randomise_zero_linears

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core machine: one torch thread each (two
    # each would make four threads wait on each other at every OpenMP barrier)
    torch.set_num_threads(1)


def make_model(name: str, size: int = 64, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A calibrated torchvision classifier, weights=None, in ``dtype``, on the CPU."""
    torch.manual_seed(seed)
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": False}
    if name.startswith(("vit", "swin", "maxvit")):
        kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).to(dtype)
    randomise_zero_linears(model)  # torchvision's ViT head
    generator = torch.Generator().manual_seed(seed + 1)
    return calibrate_bn(model, torch.randn(8, 3, size, size, dtype=dtype, generator=generator))


def small_model(name: str, size: int = 64, dtype: torch.dtype = torch.float64, seed: int = 0):
    """torchvision's own ConvNeXt / MaxViT / Swin classes at a small width and depth.

    The modules, layer names and heads of ``convnext_tiny`` (``features.0`` .. ``features.7``),
    ``maxvit_t`` (``blocks.*``, its last block the default target) and ``swin_t`` (``features``,
    ``norm``, ``permute``) at a tenth of their cost or less, for the checks that need a family's
    structure rather than its size. Random init, eval mode, ``dtype``, on the CPU.
    """
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    if name == "convnext":
        stages = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1),
                  CNBlockConfig(64, None, 1)]  # fmt: skip
        model = ConvNeXt(stages, num_classes=10)
    elif name == "maxvit":  # 2x2 windows: the grid after the stem (size / 2) and both stages
        model = MaxVit((size, size), stem_channels=16, partition_size=2, block_channels=[16, 32],
                       block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0,
                       num_classes=10)  # fmt: skip
    elif name == "swin":
        model = SwinTransformer([4, 4], 16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                                stochastic_depth_prob=0.0, num_classes=10)  # fmt: skip
    else:
        raise ValueError(f"no small {name!r}")
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(8, 3, size, size, dtype=dtype, generator=generator)
    return calibrate_bn(model.to(dtype), x)


def images(batch: int = 2, size: int | tuple[int, int] = 64, dtype=torch.float64, seed: int = 2):
    """A reproducible batch of random images (B, 3, H, W)."""
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, dtype=dtype, generator=generator)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """A folder of the explain tests' images (good, grey, palette, corrupt, truncated, ...)."""
    from test_explain import _write_images

    root = tmp_path_factory.mktemp("images")
    _write_images(root)
    return root


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory) -> Path:
    """The explain tests' class names, one per line."""
    from test_explain import LABELS

    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


@pytest.fixture(scope="session")
def resnet18():
    return make_model("resnet18")


@pytest.fixture(scope="session")
def vgg11_bn():
    return make_model("vgg11_bn")
