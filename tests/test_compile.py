"""``compile=``: the trunk through ``torch.compile``, the head eager with autograd, the same maps.

The reference is Grad-CAM by hand on the uncompiled modules (``manual_gradcam``), not the engine.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import images
from test_engine import DataBranchNet, manual_gradcam
from torch import nn

import cam_engine as ce
from cam_engine import cli
from cam_engine.commands import explain


class SmallVGG(nn.Module):
    """Conv trunk, then a flatten -> MLP head: Grad-CAM needs a real backward through the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
        )
        self.classifier = nn.Sequential(
            nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.Tanh(), nn.Linear(32, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph as it is, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args: torch.Tensor) -> object:
            self.calls += 1
            return gm.forward(*args)

        return run


def expected_cams(net: SmallVGG, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        features = net.features(x)
    return manual_gradcam(features, net.classifier, classes)


def test_the_compiled_trunk_runs_and_gives_the_manual_maps():
    net, x = SmallVGG().eval(), images(3, 16, dtype=torch.float32)
    backend = CountingBackend()
    engine = ce.CAMEngine(net, "features", "gradcam", compile={"backend": backend})
    res = engine(x, targets=ce.TopK(2))
    assert backend.calls == 1
    torch.testing.assert_close(res.cams, expected_cams(net, x, res.classes), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.logits, net(x))
    engine(x)
    assert backend.calls == 2  # the compiled graph is reused, not re-captured eagerly


def test_perturbation_forwards_run_the_compiled_trunk():
    net, x = SmallVGG().eval(), images(2, 16, dtype=torch.float32)
    backend = CountingBackend()
    compiled = ce.CAMEngine(net, "features", "scorecam", batch_size=8, compile={"backend": backend})
    res = compiled(x)
    assert backend.calls == 1 + 2 * 16 // 8  # the engine's forward, then 16 masks per image
    expected = ce.CAMEngine(net, "features", "scorecam", batch_size=8)(x)  # test_methods: = pgc
    torch.testing.assert_close(res.cams, expected.cams, rtol=1e-5, atol=1e-7)


def test_refinecam_compiles_its_extra_layers_too():
    net, x = SmallVGG().eval(), images(2, 16, dtype=torch.float32)
    backend = CountingBackend()
    options = {"layers": ["features.1"]}
    compiled = ce.CAMEngine(
        net, "features", "refinecam", method_options=options, compile={"backend": backend}
    )
    res = compiled(x)
    assert backend.calls == 3  # the engine's forward, then the base method at each layer
    expected = ce.CAMEngine(net, "features", "refinecam", method_options=options)(x)
    torch.testing.assert_close(res.cams, expected.cams, rtol=1e-5, atol=1e-7)


def test_forward_with_autograd_runs_the_eager_trunk():
    net, x = SmallVGG().eval(), images(2, 16, dtype=torch.float32).requires_grad_(True)
    backend = CountingBackend()
    wrapped = ce.wrap(net, "features", compile={"backend": backend})
    logits, _ = wrapped(x)
    assert backend.calls == 0
    (grad,) = torch.autograd.grad(logits.sum(), x)  # a compiled no-grad trunk would cut this
    (expected,) = torch.autograd.grad(net(x).sum(), x)
    torch.testing.assert_close(grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x)[0], net(x))
    assert backend.calls == 1


def test_inductor_maps_match_and_follow_weight_updates():
    net, x = SmallVGG().eval(), images(3, 16, dtype=torch.float32)
    engine = ce.CAMEngine(net, "features", "gradcam", compile=True)
    res = engine(x, targets=ce.TopK(2))
    torch.testing.assert_close(res.cams, expected_cams(net, x, res.classes), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # an optimizer step: in place, so a stale compiled copy would show
        net.features[0].weight.mul_(-0.5)
    res = engine(x, targets=ce.TopK(2))
    torch.testing.assert_close(res.cams, expected_cams(net, x, res.classes), rtol=1e-4, atol=1e-5)


def test_cuda_graph_modes_hand_out_copies_that_later_calls_leave_alone():
    net = SmallVGG().eval()
    first, second = images(3, 16, dtype=torch.float32), images(3, 16, dtype=torch.float32, seed=7)
    engine = ce.CAMEngine(net, "features", compile={"mode": "reduce-overhead"})
    wrapped = engine.model
    with torch.no_grad():
        _, features = wrapped(first)
        wrapped(second)
        torch.testing.assert_close(features, net.features(first))  # not overwritten
    res = engine(second, targets=ce.TopK(2))
    torch.testing.assert_close(
        res.cams, expected_cams(net, second, res.classes), rtol=1e-4, atol=1e-5
    )


def test_an_empty_options_dict_compiles_with_the_defaults():
    assert ce.wrap(SmallVGG().eval(), "features", compile={}).compile_options == {}
    assert ce.wrap(SmallVGG().eval(), "features").compile_options is None


def test_bad_compile_options_raise():
    net = SmallVGG().eval()
    with pytest.raises(ValueError, match="compile must be a bool or a dict"):
        ce.CAMEngine(net, "features", compile="max-autotune")
    with pytest.raises(ValueError, match=r"pass compile= and channels_last= to wrap\(\)"):
        ce.CAMEngine(ce.wrap(net, "features"), compile=True)


def test_a_hook_split_says_compile_is_ignored():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ce.CAMEngine(DataBranchNet().eval(), "body", compile=True)
    assert engine.split_kind == "hook"
    assert "compile= is ignored: the hook capture runs eagerly" in engine.model.notes


def test_explain_compile_flag_reaches_the_engine():
    parser = cli.build_parser()
    argv = ["explain", "images", "--model", "resnet18", "--device", "cpu"]
    for extra, options in (([], None), (["--compile"], {})):
        args = parser.parse_args(argv + extra)
        _, engine = explain.load(args, torch.device("cpu"))
        assert engine.model.compile_options == options
