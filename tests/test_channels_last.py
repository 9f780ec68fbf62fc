"""``channels_last=``: the trunk runs on channels-last images (by default on the CPU).

The reference is Grad-CAM by hand on the model's own modules with contiguous inputs
(``manual_gradcam``), not the engine. The layout is observed with a forward pre-hook on the
model's first convolution, which the trunk shares.
"""

from __future__ import annotations

import pytest
import torch
from conftest import images
from test_compile import SmallVGG, expected_cams
from test_engine import manual_gradcam
from torch import nn

import cam_engine as ce
from cam_engine import cli
from cam_engine.commands import explain

CHANNELS_LAST = torch.channels_last


class LayoutSpy:
    """Records, per call of ``module``, whether its input was channels-last (and not NCHW)."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: list[bool] = []
        module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple) -> None:
        (x,) = inputs
        self.seen.append(x.is_contiguous(memory_format=CHANNELS_LAST) and not x.is_contiguous())


class FlattensInTheTrunk(nn.Module):
    """A trunk with ``view(B, -1)``, which needs contiguous strides, before the target layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Linear(4 * 16 * 16, 4 * 16 * 16)
        self.features = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        mixed = self.mix(stem.view(x.shape[0], -1)).view(stem.shape)
        return self.fc(self.features(mixed).mean((2, 3)))


@pytest.mark.parametrize("channels_last", [None, True])
def test_the_trunk_gets_channels_last_images_and_the_maps_do_not_change(channels_last):
    net = SmallVGG().eval()
    spy = LayoutSpy(net.features[0])
    x = images(3, 16, dtype=torch.float32)
    engine = ce.CAMEngine(net, "features", channels_last=channels_last)
    res = engine(x, targets=ce.TopK(2))
    assert spy.seen == [True]
    torch.testing.assert_close(res.cams, expected_cams(net, x, res.classes), rtol=1e-4, atol=1e-5)
    assert res.cams.is_contiguous()


def test_channels_last_false_keeps_the_input_as_it_is():
    net = SmallVGG().eval()
    spy = LayoutSpy(net.features[0])
    x = images(3, 16, dtype=torch.float32)
    res = ce.CAMEngine(net, "features", channels_last=False)(x)
    assert spy.seen == [False]
    torch.testing.assert_close(res.cams, expected_cams(net, x, res.classes), rtol=1e-4, atol=1e-5)


def test_wrap_gives_contiguous_features_and_runs_autograd_forwards_as_given():
    net = SmallVGG().eval()
    spy = LayoutSpy(net.features[0])
    wrapped = ce.wrap(net, "features")
    x = images(2, 16, dtype=torch.float32)
    with torch.no_grad():
        logits, features = wrapped(x)
        expected_logits, expected_features = net(x), net.features(x)
    assert spy.seen == [True, False, False]
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-5)
    assert features.is_contiguous()
    wrapped(x)  # autograd on (fine-tuning through the wrapper, say): the input as given
    assert spy.seen[-1] is False


def test_a_trunk_that_needs_contiguous_strides_keeps_nchw_and_says_why():
    net = FlattensInTheTrunk().eval()
    x = images(2, 16, dtype=torch.float32)
    wrapped = ce.wrap(net, "features", input_size=(16, 16))
    assert not wrapped.current().channels_last
    assert any("channels-last input is off" in note for note in wrapped.notes)
    with pytest.warns(UserWarning, match="channels-last input is off"):
        forced = ce.CAMEngine(net, "features", input_size=(16, 16), channels_last=True)
    res = forced(x)
    with torch.no_grad():
        features = net.features(net.mix(net.stem(x).flatten(1)).view(2, 4, 16, 16))
    expected = manual_gradcam(features, lambda a: net.fc(a.mean((2, 3))), res.classes)
    torch.testing.assert_close(res.cams, expected, rtol=1e-4, atol=1e-5)


def test_off_the_cpu_the_default_leaves_the_layout_alone():
    net = SmallVGG().eval().to("meta")
    assert not ce.wrap(net, "features", input_size=(16, 16)).current().channels_last
    assert ce.wrap(net, "features", input_size=(16, 16), channels_last=True).current().channels_last


def test_bad_channels_last_options_raise():
    net = SmallVGG().eval()
    with pytest.raises(ValueError, match="channels_last must be None, True or False"):
        ce.wrap(net, "features", channels_last="yes")
    with pytest.raises(ValueError, match=r"pass compile= and channels_last= to wrap\(\)"):
        ce.CAMEngine(ce.wrap(net, "features"), channels_last=False)


def test_an_engine_built_under_autocast_returns_real_maps():
    # the layout check runs the trunk on fake tensors: autocast must not cache fake weight casts
    net = SmallVGG().eval()
    x = images(3, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = ce.CAMEngine(net, "features")(x)
        expected = expected_cams(net, x, res.classes)
    assert type(res.cams) is torch.Tensor
    torch.testing.assert_close(res.cams, expected, rtol=0.02, atol=0.02)


def test_the_layout_check_leaves_a_train_mode_model_as_it_was():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).train()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    wrapped = ce.wrap(net, "2", input_size=(16, 16))
    assert wrapped.current().channels_last
    for name, value in net.state_dict().items():  # BatchNorm's batch count included
        assert torch.equal(value, before[name]), name


def test_explain_channels_last_flags_reach_the_engine():
    parser = cli.build_parser()
    argv = ["explain", "images", "--model", "resnet18", "--device", "cpu"]
    for extra, option, used in (
        ([], None, True),
        (["--channels-last"], True, True),
        (["--no-channels-last"], False, False),
    ):
        _, engine = explain.load(parser.parse_args(argv + extra), torch.device("cpu"))
        assert engine.model.channels_last is option
        assert engine.model.current().channels_last is used
