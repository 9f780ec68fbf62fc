"""The last peer methods against the library that defines each (float64, CPU): RefineCAM
(pytorch-grad-cam 1.5.7, and torchcam 0.5 with ``fuse="torchcam"``), SESS (pytorch-grad-cam) and
LeGrad (torchcam, on a small torchvision ViT); batching over images and targets; bad inputs.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import calibrate_bn, images
from test_methods import HEATMAP_TOL, minmax, upsample_minmax
from test_methods_extra import built, torchcam_cams
from torch import Tensor, nn
from torch.testing import assert_close
from torchvision.models.vision_transformer import VisionTransformer

import cam_engine as ce

pgc = pytest.importorskip("pytorch_grad_cam")
tc = pytest.importorskip("torchcam.methods")
from pytorch_grad_cam.utils import model_targets as mt  # noqa: E402

REFINE = {"layers": ["layer2", "layer3"]}  # with the target layer4
BLOCKS = [f"encoder.layers.encoder_layer_{i}" for i in range(3)]


@functools.cache
@functools.cache
def small_cnn() -> nn.Module:
    """Three stride-2 conv stages named as a ResNet's (``layer1`` .. ``layer3``), GAP -> linear:
    SESS's hundred windows at a small cost. float64, calibrated BatchNorm."""
    torch.manual_seed(0)

    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())

    stages = {"layer1": stage(3, 16), "layer2": stage(16, 32), "layer3": stage(32, 32)}
    head = {"pool": nn.AdaptiveAvgPool2d(1), "flatten": nn.Flatten(), "fc": nn.Linear(32, 10)}
    model = nn.Sequential(OrderedDict({**stages, **head})).double()
    return calibrate_bn(model, images(8, 32))


def small_vit() -> nn.Module:
    """A 3-block torchvision ViT on 32 px images: 4x4 patches and a class token."""
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model.double().eval()


def pgc_meta(cls, model, layers, x, classes, **init) -> Tensor:
    """A pytorch-grad-cam meta-method's heatmaps (B, H, W), min-max normalised once more.

    RefineCAM is no context manager: the hooks of its base CAMs are released here.
    """
    cam = cls(model, [model.get_submodule(layer) for layer in layers], **init)
    try:
        heat = cam(x, [mt.ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        for base in getattr(cam, "base_cam_per_layer", None) or [cam.base_cam]:
            base.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return minmax(torch.from_numpy(np.asarray(heat)).double())


# 1. RefineCAM -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "pgc_base"), [(None, "GradCAMPlusPlus"), ("layercam", "LayerCAM")]
)
def test_refinecam_matches_pytorch_grad_cam(resnet18, base, pgc_base):
    x, options = images(2, 64), {**REFINE, "base": base}
    res = ce.CAMEngine(resnet18, "layer4", "refinecam", method_options=options)(x, ce.TopK(2))
    assert res.cams.shape == (2, 2, 64, 64)
    layers = [*REFINE["layers"], "layer4"]
    base_cls = getattr(pgc, pgc_base)
    for k in range(2):
        expected = pgc_meta(
            pgc.RefineCAM, resnet18, layers, x, res.classes[:, k], base_method=base_cls
        )
        assert_close(res.heatmaps[:, k], expected, atol=HEATMAP_TOL, rtol=0)
    plain = ce.CAMEngine(resnet18, "layer4", base or "gradcam++")(x, res.classes)
    assert not torch.allclose(plain.heatmaps, res.heatmaps, atol=1e-2)


@pytest.mark.parametrize(("base", "tc_base"), [("gradcam", "GradCAM"), ("layercam", "LayerCAM")])
def test_refinecam_torchcam_fuse_matches_torchcam(resnet18, base, tc_base):
    """torchcam multiplies at the largest layer's size (layer2: 8x8 at 64 px)."""
    x, options = images(2, 64), {**REFINE, "base": base, "fuse": "torchcam"}
    res = ce.CAMEngine(resnet18, "layer4", "refinecam", method_options=options)(x, [[3, 5], [1, 7]])
    assert res.cams.shape == (2, 2, 8, 8)
    layers = [*REFINE["layers"], "layer4"]
    for k in range(2):
        classes = res.classes[:, k]
        base_cls = getattr(tc, tc_base)
        expected = torchcam_cams(tc.RefineCAM, resnet18, layers, x, classes, base_method=base_cls)
        assert expected.amax() > 0
        assert_close(res.cams[:, k], expected, atol=1e-6, rtol=0)  # torchcam's 1e-8 epsilons


# 2. SESS ------------------------------------------------------------------------------------------

SESS_CASES = [
    {"num_scales": 3},
    {"num_scales": 3, "pool": "max"},
    {"num_scales": 3, "pre_filter_ratio": 0.5, "smooth": False},
    {"scales": [32, 48], "step_size": 12, "theta": 0.2, "use_softmax_scores": False},
]


@pytest.mark.parametrize("options", SESS_CASES)
def test_sess_matches_pytorch_grad_cam(options):
    """batch_size=7: chunks mix images and windows, and do not divide a scale's windows. Class 4
    has windows of image 0 whose Grad-CAM is 0 in one corner: SESS must not count them there."""
    model, x = built("resnet18", 32), images(2, 32)
    engine = ce.CAMEngine(model, "layer3", "sess", batch_size=7, method_options=options)
    res = engine(x, [4, 2])
    expected = pgc_meta(pgc.SESS, model, ["layer3"], x, [4, 2], **options)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


def test_sess_with_a_base_matches_pytorch_grad_cam():
    model, x = built("resnet18", 32), images(2, 32)
    options = {"num_scales": 2, "base": "gradcam++"}
    res = ce.CAMEngine(model, "layer3", "sess", method_options=options)(x, [4, 2])
    init = {"num_scales": 2, "base_method": pgc.GradCAMPlusPlus}
    expected = pgc_meta(pgc.SESS, model, ["layer3"], x, [4, 2], **init)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


@pytest.mark.slow
def test_sess_defaults_match_pytorch_grad_cam():
    """12 scales from 32 to 131 px: about 130 windows, 15 s in pytorch-grad-cam."""
    model, x = small_cnn(), images(1, 32)
    res = ce.CAMEngine(model, "layer3", "sess")(x, [4])
    expected = pgc_meta(pgc.SESS, model, ["layer3"], x, [4])
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


SESS_CHANGES = [
    {"pool": "max"},
    {"pre_filter_ratio": 0.5},
    {"smooth": False},
    {"theta": 0.3},
    {"use_softmax_scores": False},
    {"step_size": 12},
    {"scales": [32, 40, 64]},
    {"base": "layercam"},
]


def test_sess_options_change_the_map():
    model, x = small_cnn(), images(1, 32)

    def run(**change):
        options = {"num_scales": 3, **change}
        return ce.CAMEngine(model, "layer3", "sess", method_options=options)(x, [4]).heatmaps

    default = run()
    for change in SESS_CHANGES:
        assert not torch.allclose(default, run(**change), atol=1e-3), change


# 3. LeGrad ----------------------------------------------------------------------------------------


def class_token_projection(model):
    return lambda tokens: model.heads(model.encoder.ln(tokens[:, 0]))


@pytest.mark.parametrize(
    ("layer", "first", "projected"),
    [
        (None, 2, False),  # the default target: the last block's ln_1
        ("encoder.layers.encoder_layer_2", 2, False),  # the engine names it "encoder.layers"
        ("encoder.layers.encoder_layer_0", 0, False),
        ("encoder.layers.encoder_layer_1.mlp", 1, True),
    ],
)
def test_legrad_matches_torchcam(layer, first, projected):
    model, x = small_vit(), images(2, 32)
    options = {"projection": class_token_projection(model)} if projected else {}
    engine = ce.CAMEngine(model, layer, "legrad", input_size=(32, 32), method_options=options)
    res = engine(x, [[3, 5], [1, 7]])
    assert res.cams.shape == (2, 2, 4, 4)
    init = {"score_projection": options["projection"]} if projected else {}
    for k in range(2):
        expected = torchcam_cams(tc.LeGrad, model, BLOCKS[first:], x, res.classes[:, k], **init)
        assert expected.amax() > 0
        assert_close(res.cams[:, k], expected, atol=1e-10 * expected.amax(), rtol=1e-7)
        assert_close(
            res.heatmaps[:, k], upsample_minmax(expected, (32, 32)), atol=HEATMAP_TOL, rtol=0
        )


# 4. batching: B = 2, K = 2 equals single calls ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options"),
    [("refinecam", REFINE), ("sess", {"num_scales": 2, "pre_filter_ratio": 0.3}), ("legrad", {})],
)
def test_batched_equals_single_calls(resnet18, method, options):
    model, layer, size = {
        "refinecam": (resnet18, "layer4", 64),
        "sess": (small_cnn(), "layer3", 32),
        "legrad": (small_vit(), None, 32),
    }[method]
    x, classes = images(2, size), torch.tensor([[3, 5], [1, 7]])
    engine = ce.CAMEngine(
        model, layer, method, input_size=(size, size), batch_size=5, method_options=options
    )
    batched = engine(x, classes).cams
    for b in range(2):
        for k in range(2):
            single = engine(x[b : b + 1], classes[b : b + 1, k : k + 1]).cams[0, 0]
            assert_close(batched[b, k], single, atol=1e-12 * single.abs().max(), rtol=1e-9)
    assert not torch.allclose(batched[:, 0], batched[:, 1])


# 5. bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("legrad", {}, "needs a vision transformer"),
        ("refinecam", {}, "needs more layers"),
        ("refinecam", {"layers": ["layer4"]}, "must differ"),
        ("refinecam", {**REFINE, "fuse": "sum"}, "unknown fuse 'sum'"),
        ("refinecam", {**REFINE, "lyers": 1}, r"unknown option\(s\) \['lyers'\]"),
        ("refinecam", {**REFINE, "base": "sess"}, "cannot be 'sess'"),
        ("refinecam", {**REFINE, "base": "gradcamm"}, "unknown method 'gradcamm'"),
        ("sess", {"pool": "avg"}, "pool has to be one of"),
        ("sess", {"pre_filter_ratio": 1.0}, r"pre_filter_ratio has to be in \[0, 1\)"),
        ("sess", {"scales": [16, 32]}, "at least the window size 32"),
        ("sess", {"step_size": 0}, "at least 1"),
        ("sess", {"num_scale": 2}, r"unknown option\(s\) \['num_scale'\] .*valid: .*num_scales"),
        ("sess", {"base_options": {"k": 2}}, r"unknown option\(s\) \['k'\] for method 'gradcam'"),
    ],
)
def test_cnn_methods_reject_bad_options(method, options, match):
    with pytest.raises(ValueError, match=match):
        engine = ce.CAMEngine(built("resnet18", 32), "layer4", method, method_options=options)
        engine(images(1, 32))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prefix_tokens": -1}, "non-negative int"),
        ({"prefix_tokens": 0}, "do not fill a grid"),
        ({"projection": "heads"}, "projection must be a function"),
    ],
)
def test_legrad_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        engine = ce.CAMEngine(
            small_vit(), None, "legrad", input_size=(32, 32), method_options=options
        )
        engine(images(1, 32))


def test_legrad_needs_a_projection_outside_torchvision():
    class Wrapped(nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            return self.vit(x)

    vit = small_vit()
    engine = ce.CAMEngine(Wrapped(vit).eval(), "vit.encoder.layers.encoder_layer_2", "legrad")
    with pytest.raises(ValueError, match="pass method_options=\\{'projection'"):
        engine(images(1, 32))
    projected = ce.CAMEngine(
        Wrapped(vit).eval(),
        "vit.encoder.layers.encoder_layer_2",
        "legrad",
        method_options={"projection": lambda t: vit.heads(vit.encoder.ln(t.mean(1)))},
    )
    direct = ce.CAMEngine(vit, "encoder.layers.encoder_layer_2", "legrad")
    assert_close(projected(images(1, 32)).cams, direct(images(1, 32)).cams, atol=1e-12, rtol=0)
