"""Engine behaviour: what it computes on hand-checkable models, and what it must never do."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_model
from torch import nn

import cam_engine as ce
from cam_engine.demo import model as demo
from cam_engine.demo import shapes
from cam_engine.layout import to_nchw


def manual_gradcam(features: torch.Tensor, head, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by hand: (B, C, h, w) map, head callable, (B, K) classes -> (B, K, h, w)."""
    maps = []
    for k in range(classes.shape[1]):
        a = features.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(head(a).gather(1, classes[:, k : k + 1]).sum(), a)
        maps.append((g.mean((2, 3), keepdim=True) * a).sum(1).relu().detach())
    return torch.stack(maps, 1)


class TutorialCAMNet(nn.Module):
    """The classic CAM tutorial model: conv trunk, AvgPool2d(7), Linear; returns (logits, A)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128, 256, 512):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            width = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(7)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        features = self.features(x)
        return self.fc(self.pool(features).view(features.size(0), -1)), features


class ShapeBranchNet(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def branch(self, x):
        return F.max_pool2d(x, 2) if x.shape[-1] > 32 else x

    def forward(self, x):
        x = self.branch(self.stem(x).relu())
        return self.fc(self.body(x).relu().amax((2, 3)))

    def head(self, a):
        return self.fc(a.relu().amax((2, 3)))

    def features(self, x):
        return self.body(self.branch(self.stem(x).relu()))


class DataBranchNet(ShapeBranchNet):
    """Control flow on a value: neither tracer works, the forward-hook capture does."""

    def branch(self, x):
        return x * 2 if x.mean() > 0 else x


def small_net_input(size=48):
    return images(3, size, dtype=torch.float32)


# --- what it computes -------------------------------------------------------------------------


@pytest.mark.parametrize("net_cls,kind", [(ShapeBranchNet, "export"), (DataBranchNet, "hook")])
def test_fallback_splits_equal_manual_gradcam(net_cls, kind):
    torch.manual_seed(0)
    net = net_cls().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = ce.CAMEngine(net, "body", "gradcam")
    assert engine.split_kind == kind
    assert ("hook" in " ".join(str(w.message) for w in caught)) == (kind == "hook")
    assert engine.model.notes and engine.model.notes[0].startswith("torch.fx")
    for size in (48, 24):  # the export split is rebuilt per input size (its branch differs)
        x = small_net_input(size)
        res = engine(x, targets=ce.TopK(2))
        expected = manual_gradcam(net.features(x), net.head, res.classes)
        torch.testing.assert_close(res.cams, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.logits, net(x))


def test_tutorial_model_closed_form_cam_and_size_change():
    torch.manual_seed(0)
    net = TutorialCAMNet().eval()
    engine = ce.CAMEngine(net, "features", "cam")
    assert engine.model.gap_linear is not None
    x = images(2, 224, dtype=torch.float32)
    res = engine(x, targets=ce.TopK(3))
    features = net.features(x)
    expected = torch.einsum("bkc,bchw->bkhw", net.fc.weight[res.classes], features).relu()
    torch.testing.assert_close(res.cams, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.logits, net(x)[0])
    # at 256 px the map is 8x8 and AvgPool2d(7) is no longer global: no CAM, Grad-CAM by autograd
    bigger = images(2, 256, dtype=torch.float32)
    with pytest.raises(ValueError, match="global average"):
        engine(bigger)
    gradcam = ce.CAMEngine(net, "features", "gradcam")(bigger)
    head = lambda a: net.fc(net.pool(a).flatten(1))  # noqa: E731
    torch.testing.assert_close(
        gradcam.cams, manual_gradcam(net.features(bigger), head, gradcam.classes)
    )


def test_heatmaps_are_upsampled_minmax_of_cams(resnet18):
    x = images(2, 64)
    res = ce.CAMEngine(resnet18, "layer4")(x)
    up = F.interpolate(res.cams, size=(64, 64), mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    torch.testing.assert_close(res.heatmaps, (up - lo) / (hi - lo))
    assert res.heatmaps.shape == (2, 1, 64, 64) and res.classes.shape == (2, 1)


def test_vit_tokens_are_laid_out_on_the_grid():
    tokens = torch.arange(2 * 17 * 3.0).reshape(2, 17, 3)  # class token + 4x4 grid, C=3
    grid = to_nchw(tokens, None, (64, 64))
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid[1, 2, 3, 1], tokens[1, 1 + 3 * 4 + 1, 2])
    torch.testing.assert_close(to_nchw(tokens, "vit", (64, 64)), grid)
    nhwc = torch.randn(2, 4, 4, 8)
    torch.testing.assert_close(to_nchw(nhwc, None, (64, 64)), nhwc.permute(0, 3, 1, 2))
    nchw = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(to_nchw(nchw, None, (64, 64)), nchw)
    with pytest.raises(ValueError, match="grid"):  # 3 tokens: no 2x2 grid behind any prefix
        to_nchw(torch.randn(2, 3, 5), None, (64, 64))


def test_vit_gradcam_matches_manual_on_token_map():
    model = make_model("vit_b_16", size=32, dtype=torch.float32)
    engine = ce.CAMEngine(model, None, "gradcam", input_size=(32, 32))
    assert engine.target_layer == "encoder.layers.encoder_layer_11.ln_1"
    x = images(2, 32, dtype=torch.float32)
    res = engine(x, targets=ce.TopK(2))
    assert res.cams.shape == (2, 2, 2, 2)
    block = model.encoder.layers[-1]
    residual = {}
    block.ln_1.register_forward_hook(lambda m, i, o: residual.update(x=i[0], a=o))
    model(x)
    model.encoder.layers[-1].ln_1._forward_hooks.clear()

    def head(a):  # the rest of the last block, final norm and the class-token head
        y = block.self_attention(a, a, a, need_weights=False)[0] + residual["x"]
        y = y + block.mlp(block.ln_2(y))
        return model.heads(model.encoder.ln(y)[:, 0])

    maps = []
    for k in range(2):
        a = residual["a"].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(head(a).gather(1, res.classes[:, k : k + 1]).sum(), a)
        a_grid, g_grid = (t[:, 1:].reshape(2, 2, 2, -1).permute(0, 3, 1, 2) for t in (a, g))
        maps.append((g_grid.mean((2, 3), keepdim=True) * a_grid).sum(1).relu())
    torch.testing.assert_close(res.cams, torch.stack(maps, 1).detach(), rtol=1e-4, atol=1e-6)


# --- what it must never do --------------------------------------------------------------------


@pytest.mark.parametrize("closed_form", [True, False])
def test_no_parameter_grads_and_no_trunk_activations_saved(resnet18, closed_form):
    x = images(2, 64)
    engine = ce.CAMEngine(resnet18, "layer4", closed_form=closed_form)
    params = {p.data_ptr() for p in resnet18.parameters()}
    saved = []  # activations autograd keeps for backward (parameters excluded)

    def pack(tensor):
        if tensor.data_ptr() not in params:
            saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        res = engine(x)
    assert all(p.grad is None for p in resnet18.parameters())
    assert res.heatmaps.grad_fn is None and res.cams.grad_fn is None
    if closed_form:
        assert saved == []  # no backward at all
    else:  # only the head (avgpool, fc) saved anything: nothing larger than layer4's map
        assert saved and all(s.numel() <= 2 * 512 * 2 * 2 for s in saved), saved


def test_caller_model_left_untouched(resnet18):
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    flags = [p.requires_grad for p in resnet18.parameters()]
    modules = dict(resnet18.named_modules())
    ce.CAMEngine(resnet18, "layer3", closed_form=False)(images(2, 64))
    assert not resnet18.training
    assert dict(resnet18.named_modules()) == modules
    assert [p.requires_grad for p in resnet18.parameters()] == flags
    assert all(not m._forward_hooks and not m._backward_hooks for m in resnet18.modules())
    for key, value in resnet18.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_inference_mode_no_grad_and_frozen_parameters_give_the_same_maps():
    model = make_model("densenet121", dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    engine = ce.CAMEngine(model, "features", "gradcam")
    x = images(2, 64, dtype=torch.float32)
    plain = engine(x, targets=ce.TopK(2))
    with torch.inference_mode():
        inside_inference = engine(x, targets=ce.TopK(2))
    with torch.no_grad():
        inside_no_grad = engine(x, targets=ce.TopK(2))
    torch.testing.assert_close(inside_inference.cams, plain.cams, rtol=0, atol=0)
    torch.testing.assert_close(inside_no_grad.cams, plain.cams, rtol=0, atol=0)


def test_inplace_relu_after_target_does_not_corrupt_features():
    model = make_model("densenet121", dtype=torch.float32)
    x = images(2, 64, dtype=torch.float32)
    captured = []
    handle = model.features.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    expected_logits = model(x)
    handle.remove()
    logits, features = ce.wrap(model, "features")(x)
    assert features.min() < 0  # the pre-ReLU map, as `features` returned it
    torch.testing.assert_close(features, captured[0])
    torch.testing.assert_close(logits, expected_logits)


def test_engines_on_one_model_are_reentrant(resnet18):
    x = images(2, 64)
    a, b = ce.CAMEngine(resnet18, "layer3"), ce.CAMEngine(resnet18, "layer4", closed_form=False)
    first_a, first_b = a(x).cams, b(x).cams
    torch.testing.assert_close(a(x).cams, first_a, rtol=0, atol=0)
    torch.testing.assert_close(b(x).cams, first_b, rtol=0, atol=0)


def test_split_follows_mode_and_dtype_changes():
    net = TutorialCAMNet()
    net.fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 10))
    net.eval()
    engine = ce.CAMEngine(net, "features", "gradcam")
    assert engine.model.gap_linear is not None
    net.train()  # active dropout: the head is no longer affine
    assert engine.model.gap_linear is not None  # still GAP -> dropout -> linear structurally
    features = torch.rand(1, 512, 7, 7)
    assert not engine.model.gap_linear.applies(features)
    net.eval().double()
    res = engine(images(1, 224))
    assert res.cams.dtype == torch.float64


def test_output_selectors():
    class DictOut(TutorialCAMNet):
        def forward(self, x):
            logits, features = super().forward(x)
            return {"aux": features, "logits": logits}

    net = DictOut().eval()
    x = images(1, 224, dtype=torch.float32)
    expected = net(x)["logits"]
    for selector in ("logits", lambda out: out["logits"]):
        logits, _ = ce.wrap(net, "features", output=selector)(x)
        torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="output="):
        ce.wrap(net, "features", output="nope")(x)


# --- errors -----------------------------------------------------------------------------------


def test_default_target_layers():
    expected = {"resnet18": "layer4", "vgg11": "features", "densenet121": "relu"}
    for name, layer in expected.items():
        assert ce.wrap(make_model(name, dtype=torch.float32)).target_layer == layer


def test_wrong_layer_name_lists_close_candidates(resnet18):
    with pytest.raises(ValueError, match=r"unknown target layer 'layr4'.*layer4"):
        ce.CAMEngine(resnet18, "layr4")
    with pytest.raises(ValueError, match="unknown target layer"):
        ce.CAMEngine(DataBranchNet(), "bdy")  # hook fallback checks names too


def test_cam_on_a_head_that_is_not_gap_linear_says_why(vgg11_bn):
    with pytest.raises(ValueError, match="global average pooling"):
        ce.CAMEngine(vgg11_bn, "features", "cam")


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(3, 64, 64, dtype=torch.float64), "single image"),
        (torch.zeros(0, 3, 64, 64, dtype=torch.float64), "empty batch"),
        (torch.full((1, 3, 64, 64), float("nan"), dtype=torch.float64), "NaN"),
        (torch.full((1, 3, 64, 64), float("inf"), dtype=torch.float64), "inf"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point"),
        ([[0.0]], "tensor"),
    ],
)
def test_bad_images_raise(resnet18, x, match):
    with pytest.raises(ValueError, match=match):
        ce.CAMEngine(resnet18, "layer4")(x)


@pytest.mark.parametrize(
    "targets,match",
    [
        (1000, "out of range"),
        (-1, "out of range"),
        ([1, 2, 3], "do not fit a batch of 2"),
        (ce.TopK(1001), "larger than the number of classes"),
        (ce.BottomK(0), "positive"),
        (torch.tensor([0.5, 1.0]), "integers"),
        (torch.zeros(2, 0, dtype=torch.long), "K = 0"),
    ],
)
def test_bad_targets_raise(resnet18, targets, match):
    with pytest.raises(ValueError, match=match):
        ce.CAMEngine(resnet18, "layer4")(images(2, 64), targets=targets)


def test_unknown_method_and_reshape_raise(resnet18):
    with pytest.raises(ValueError, match="available: .*gradcam"):
        ce.CAMEngine(resnet18, "layer4", "gradcan")
    with pytest.raises(ValueError, match="unknown reshape"):
        ce.CAMEngine(resnet18, "layer4", reshape="vitt")


def test_training_mode_warns():
    net = TutorialCAMNet().train()
    with pytest.warns(UserWarning, match="training mode"):
        ce.CAMEngine(net, "features")
    assert net.training


def test_module_called_twice_warns_and_names_each_call(resnet18):
    with pytest.warns(UserWarning, match=r"runs 2 times.*layer4\.1\.relu_1"):
        first = ce.wrap(resnet18, "layer4.1.relu")
    second = ce.wrap(resnet18, "layer4.1.relu_1")
    x = images(1, 64)
    block = resnet18.layer4[1]
    calls = []
    handle = block.relu.register_forward_hook(lambda m, i, o: calls.append(o.clone()))
    resnet18(x)
    handle.remove()
    torch.testing.assert_close(first(x)[1], calls[0])
    torch.testing.assert_close(second(x)[1], calls[1])


def test_autocast_gives_float32_heatmaps_close_to_float64(resnet18):
    x = images(2, 64)
    expected = ce.CAMEngine(resnet18, "layer4", "gradcam")(x)
    model = copy.deepcopy(resnet18).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = ce.CAMEngine(model, "layer4", "gradcam")(x.float(), expected.classes)
    assert res.cams.dtype == torch.bfloat16 and res.heatmaps.dtype == torch.float32
    error = (res.heatmaps.double() - expected.heatmaps).abs().max()
    assert 1e-4 < error < 0.1  # bf16 keeps 8 significant bits


def test_bf16_autocast_maps_of_a_trained_model_stay_close():
    model = demo.pretrained().eval()
    x = shapes.single(32, seed=5).images
    expected = ce.CAMEngine(copy.deepcopy(model).double(), method="gradcam")(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = ce.CAMEngine(model, method="gradcam")(x, expected.classes)
    assert res.cams.dtype == torch.bfloat16
    error = (res.heatmaps.double() - expected.heatmaps).abs()
    assert error.max() < 0.05 and error.mean() < 5e-3  # measured: 0.014 and 7e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_images_finds_one_non_finite_value_among_finite_ones(dtype):
    from cam_engine.explainer import check_images

    x = torch.randn(2, 3, 5, 7).to(dtype)
    check_images(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 4, 6] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            check_images(y)
    check_images(y, check_finite=False)
    check_images(torch.empty(1, 3, 0, 4))  # no pixel: nothing to check
