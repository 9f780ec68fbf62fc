"""The CAM family against the libraries that define each method (float64, CPU).

Oracles: pytorch-grad-cam 1.5.7 (every method), captum (GuidedBackprop, GuidedGradCam) and
closed forms written out here. pytorch-grad-cam normalises its maps with an epsilon and returns
float32, so its heatmaps are min-max normalised once more (see test_parity.py) and compared with
HEATMAP_TOL.
"""

from __future__ import annotations

import functools
from copy import deepcopy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import calibrate_bn, images, make_model, small_model
from torch import Tensor, nn
from torch.testing import assert_close

import cam_engine as ce

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils import model_targets as mt  # noqa: E402

HEATMAP_TOL = 1e-4

PGC_CLASSES = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "hirescam": pgc.HiResCAM,
    "gradcam-elementwise": pgc.GradCAMElementWise,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
    "fullgrad": pgc.FullGrad,
}
GRADIENT_METHODS = [
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "gradcam-elementwise",
    "eigencam",
    "eigengradcam",
]


def minmax(maps: Tensor) -> Tensor:
    """Per-map min-max over the last two dims; every map must be non-constant."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    assert (span > 0).all(), "a constant map would make the comparison vacuous"
    return (maps - lo) / span


def pgc_heatmaps(method, model, layers, x, targets, reshape_transform=None, **call) -> Tensor:
    """pytorch-grad-cam's heatmaps (B, H, W), min-max normalised once more, float64.

    ``targets``: a list of pytorch-grad-cam targets or class ids (one per image).
    """
    if targets is not None and not callable(targets[0]):
        targets = [mt.ClassifierOutputTarget(int(c)) for c in targets]
    modules = [model.get_submodule(name) for name in layers]
    kwargs = {"reshape_transform": reshape_transform} if method != "fullgrad" else {}
    try:
        with PGC_CLASSES[method](model, modules, **kwargs) as cam:
            if method in ("scorecam", "ablationcam"):
                cam.batch_size = 64
            heat = cam(x, targets, **call)
    finally:
        model.zero_grad(set_to_none=True)  # models are shared with other tests
    return minmax(torch.from_numpy(np.asarray(heat)).double())


def pgc_raw(method, model, layer, x, classes, reshape_transform=None, **call) -> Tensor:
    """pytorch-grad-cam's float64 map (B, h, w) before its ReLU and scaling."""

    class Raw(PGC_CLASSES[method]):
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    targets = [mt.ClassifierOutputTarget(int(c)) for c in classes]
    try:
        with Raw(model, [model.get_submodule(layer)], reshape_transform=reshape_transform) as cam:
            cam(x, targets, **call)
    finally:
        model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.asarray(cam.raw)).double()


def signed_projection(projection: Tensor, channel_sum: Tensor) -> Tensor:
    """ReLU of pytorch-grad-cam's projection with the sign the library fixes (see
    ``methods.first_component``): positively correlated with the unsmoothed channel sum."""
    agreement = (projection * channel_sum).sum(dim=(-2, -1), keepdim=True)
    return torch.where(agreement < 0, -projection, projection).relu()


def eigen_oracle(method, model, layer, x, classes, transform=None, **call) -> Tensor:
    """Expected cams (B, h, w) of an eigen method / eigen_smooth from pytorch-grad-cam."""
    projection = pgc_raw(method, model, layer, x, classes, transform, **call)
    if method == "eigencam":
        with torch.no_grad():
            channel_sum = ce.layout.to_nchw(ce.wrap(model, layer)(x)[1], None, x.shape[2:]).sum(1)
    else:
        plain = {"eigengradcam": "hirescam"}.get(method, method)
        channel_sum = pgc_raw(plain, model, layer, x, classes, transform)
    return signed_projection(projection, channel_sum)


def upsample_minmax(cams: Tensor, size) -> Tensor:
    return minmax(F.interpolate(cams[:, None], size=size, mode="bilinear")[:, 0])


@functools.cache
def built(name: str, size: int = 64) -> nn.Module:
    return make_model(name, size=size)


def _vit_tokens(t: Tensor) -> Tensor:
    side = int((t.shape[1] - 1) ** 0.5)
    return t[:, 1:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


CNNS = [("resnet18", "layer4"), ("vgg11_bn", "features.27")]
VIT = ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1")


# 1. gradient and activation methods -------------------------------------------------------------


@pytest.mark.parametrize("method", GRADIENT_METHODS)
@pytest.mark.parametrize(("name", "layer"), CNNS)
def test_gradient_methods_match_pytorch_grad_cam(request, name, layer, method):
    model, x = request.getfixturevalue(name), images(2, 64)
    res = ce.CAMEngine(model, layer, method)(x)
    assert res.cams.shape == (2, 1, *res.cams.shape[2:])
    check_against_pgc(res, method, model, layer, x)


def check_against_pgc(res, method, model, layer, x, transform=None, **call):
    if method.startswith("eigen") or call.get("eigen_smooth"):
        cams = eigen_oracle(method, model, layer, x, res.classes[:, 0], transform, **call)
        assert_close(res.cams[:, 0], cams, atol=1e-10 * cams.abs().max(), rtol=1e-6)
        expected = upsample_minmax(cams, x.shape[2:])
    else:
        expected = pgc_heatmaps(method, model, [layer], x, res.classes[:, 0], transform, **call)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", *GRADIENT_METHODS])
def test_gradient_methods_match_pytorch_grad_cam_on_vit(method):
    name, layer = VIT
    model, x = built(name), images(2, 64)
    res = ce.CAMEngine(model, layer, method)(x)
    check_against_pgc(res, method, model, layer, x, _vit_tokens)


# 2. eigen_smooth / aug_smooth ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam"])
def test_eigen_smooth_matches_pytorch_grad_cam(resnet18, method):
    x = images(2, 64)
    res = ce.CAMEngine(resnet18, "layer3", method, eigen_smooth=True)(x)
    check_against_pgc(res, method, resnet18, "layer3", x, eigen_smooth=True)


@pytest.mark.parametrize(("method", "eigen"), [("gradcam", False), ("xgradcam", False)])
def test_aug_smooth_matches_pytorch_grad_cam(vgg11_bn, method, eigen):
    x = images(2, 32)
    engine = ce.CAMEngine(vgg11_bn, "features.27", method, aug_smooth=True, eigen_smooth=eigen)
    res = engine(x, [3, 7])
    call = {"aug_smooth": True, "eigen_smooth": eigen}
    expected = pgc_heatmaps(method, vgg11_bn, ["features.27"], x, [3, 7], **call)
    assert torch.equal(res.classes, torch.tensor([[3], [7]]))
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


def test_eigen_smooth_rejected_where_undefined(resnet18):
    with pytest.raises(ValueError, match="eigen_smooth form"):
        ce.CAMEngine(resnet18, "layer4", "guided-backprop", eigen_smooth=True)


# 3. perturbation methods --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer", "size"),
    [("resnet18", "layer2", 32), ("vgg11_bn", "features.2", 32)],  # 128 and 64 masks
)
@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_methods_match_pytorch_grad_cam(name, layer, size, method):
    model, x = built(name, 32), images(1, size)
    res = ce.CAMEngine(model, layer, method, batch_size=64)(x)
    expected = pgc_heatmaps(method, model, [layer], x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


def test_ablationcam_closed_form_equals_running_the_head(resnet18):
    """On a GAP -> linear head the ablated scores are closed-form; closed_form=False runs the head
    on every ablated map (checked against pytorch-grad-cam above)."""
    x = images(2, 64)
    fast = ce.CAMEngine(resnet18, "layer4", "ablationcam")(x, ce.TopK(2))
    slow = ce.CAMEngine(resnet18, "layer4", "ablationcam", closed_form=False)(x, ce.TopK(2))
    assert_close(fast.cams, slow.cams, atol=1e-9 * slow.cams.max(), rtol=1e-7)
    assert_close(fast.heatmaps, slow.heatmaps, atol=1e-8, rtol=0)


def test_scorecam_batch_size_does_not_change_maps(resnet18):
    x = images(1, 32)
    a = ce.CAMEngine(resnet18, "layer2", "scorecam", batch_size=7)(x, ce.TopK(2))
    b = ce.CAMEngine(resnet18, "layer2", "scorecam", batch_size=128)(x, ce.TopK(2))
    assert_close(a.cams, b.cams, atol=1e-12, rtol=1e-10)


# 4. FullGrad ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_fullgrad_matches_pytorch_grad_cam(request, name):
    model, x = request.getfixturevalue(name), images(2, 64)
    res = ce.CAMEngine(model, None, "fullgrad")(x)
    assert res.cams.shape == (2, 1, 64, 64)
    expected = pgc_heatmaps("fullgrad", model, [], x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


# 5. guided backpropagation ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_guided_backprop_matches_pytorch_grad_cam_and_captum(request, name):
    attr = pytest.importorskip("captum.attr")
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel

    model, x = request.getfixturevalue(name), images(2, 64)
    res = ce.CAMEngine(model, None, "guided-backprop")(x, ce.TopK(2))
    assert res.guided.shape == (2, 2, 3, 64, 64) and res.cams.shape == (2, 2, 64, 64)
    assert_close(res.cams, res.guided.abs().amax(2), atol=0, rtol=0)
    try:
        # pytorch-grad-cam explains the first image of a batch only, and leaves one shared ReLU
        # instance in place of the model's ReLUs: give it a copy
        copy = deepcopy(model)
        for b in range(2):
            got = GuidedBackpropReLUModel(copy)(x[b : b + 1].clone(), int(res.classes[b, 0]))
            expected = torch.from_numpy(got).permute(2, 0, 1)
            assert_close(res.guided[b, 0], expected, atol=1e-10, rtol=1e-8)
        gbp = attr.GuidedBackprop(model)
        for k in range(2):
            expected = gbp.attribute(x.clone(), target=res.classes[:, k])
            assert_close(res.guided[:, k], expected, atol=1e-10, rtol=1e-8)
    finally:
        model.zero_grad(set_to_none=True)


def test_guided_gradcam_matches_captum_and_pgc_recipe(vgg11_bn):
    attr = pytest.importorskip("captum.attr")
    x, layer = images(2, 64), "features.27"
    res = ce.CAMEngine(vgg11_bn, layer, "guided-gradcam")(x)
    backprop = ce.CAMEngine(vgg11_bn, layer, "guided-backprop")(x, res.classes)
    gradcam = ce.CAMEngine(vgg11_bn, layer, "gradcam")(x, res.classes)
    # pytorch-grad-cam's recipe: normalised Grad-CAM heatmap times the guided gradient
    recipe = backprop.guided * gradcam.heatmaps[:, :, None]
    assert_close(res.guided, recipe, atol=1e-12, rtol=1e-10)
    # captum: raw Grad-CAM map upsampled with nearest neighbours times the guided gradient
    try:
        explainer = attr.GuidedGradCam(vgg11_bn, vgg11_bn.get_submodule(layer))
        expected = explainer.attribute(x.clone(), target=res.classes[:, 0])
    finally:
        vgg11_bn.zero_grad(set_to_none=True)
    nearest = F.interpolate(gradcam.cams, size=(64, 64), mode="nearest")
    assert_close(backprop.guided[:, 0] * nearest[:, 0, None], expected, atol=1e-10, rtol=1e-8)


# 6. several target layers -----------------------------------------------------------------------


def test_multi_layer_mean_matches_pytorch_grad_cam_and_max_fuses(resnet18):
    x, layers = images(2, 64), ["layer3", "layer4"]
    res = ce.CAMEngine(resnet18, layers, "gradcam")(x)
    assert ce.CAMEngine(resnet18, layers).target_layer == layers
    expected = pgc_heatmaps("gradcam", resnet18, layers, x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
    singles = [ce.CAMEngine(resnet18, layer)(x, res.classes).cams for layer in layers]
    per_layer = [F.interpolate(minmax(c), size=(64, 64), mode="bilinear") for c in singles]
    fused = ce.CAMEngine(resnet18, layers, fusion="max")(x, res.classes)
    assert_close(fused.heatmaps, minmax(torch.maximum(*per_layer)), atol=1e-12, rtol=0)


# 7. targets -------------------------------------------------------------------------------------


def test_softmax_target_matches_pytorch_grad_cam(resnet18):
    x = images(2, 64)
    res = ce.CAMEngine(resnet18, "layer4", "gradcam++")(x, ce.targets.SoftmaxScore([5, 9]))
    assert torch.equal(res.classes, torch.tensor([[5], [9]]))
    targets = [mt.ClassifierOutputSoftmaxTarget(c) for c in (5, 9)]
    expected = pgc_heatmaps("gradcam++", resnet18, ["layer4"], x, targets)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
    plain = ce.CAMEngine(resnet18, "layer4", "gradcam++")(x, [5, 9])
    assert not torch.allclose(plain.heatmaps, res.heatmaps, atol=1e-3)


def test_binary_target_and_score_function_match_pytorch_grad_cam():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 1),
    ).double()  # fmt: skip
    model = calibrate_bn(model, images(8, 16, seed=5))
    x = images(2, 16)
    res = ce.CAMEngine(model, "4", "layercam")(x, ce.targets.BinaryScore(0))
    targets = [mt.BinaryClassifierOutputTarget(0)] * 2
    expected = pgc_heatmaps("layercam", model, ["4"], x, targets)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
    fn = ce.CAMEngine(model, "4", "layercam")(x, lambda out: -out)
    assert torch.equal(fn.classes, torch.full((2, 1), -1))
    assert_close(fn.heatmaps, res.heatmaps, atol=1e-12, rtol=0)


@pytest.mark.slow
def test_segmentation_target_on_fcn_matches_pytorch_grad_cam():
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    model = fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False).double()
    model = calibrate_bn(model, images(4, 64, seed=7))
    x = images(1, 64)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:40, 20:50] = True
    engine = ce.CAMEngine(model, "backbone.layer4", "gradcam", output="out")
    res = engine(x, ce.targets.SegmentationScore(3, mask))
    assert res.logits.shape == (1, 21, 64, 64) and torch.equal(res.classes, torch.tensor([[3]]))

    class Out(nn.Module):  # pytorch-grad-cam's tutorial wrapper: the "out" tensor
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return self.m(t)["out"]

    wrapped = Out(model)
    targets = [mt.SemanticSegmentationTarget(3, mask.double().numpy())]
    expected = pgc_heatmaps("gradcam", wrapped, ["m.backbone.layer4"], x, targets)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


def test_score_targets_reject_bad_shapes(resnet18):
    engine = ce.CAMEngine(resnet18, "layer4")
    with pytest.raises(ValueError, match="one logit per image"):
        engine(images(2, 64), ce.targets.BinaryScore(1))
    with pytest.raises(ValueError, match="score function"):
        engine(images(2, 64), lambda out: out.sum())


# 8. volumes (B, C, D, H, W) ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "eigencam", "scorecam"])
def test_volumes_upsample_trilinearly(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double().eval()  # fmt: skip
    x = torch.randn(
        2, 1, 8, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    res = ce.CAMEngine(model, "3", method)(x)
    assert res.cams.shape == (2, 1, 4, 6, 5) and res.heatmaps.shape == (2, 1, 8, 12, 10)
    up = F.interpolate(res.cams, size=(8, 12, 10), mode="trilinear", align_corners=False)
    lo = up.flatten(2).amin(-1)[..., None, None, None]
    hi = up.flatten(2).amax(-1)[..., None, None, None]
    assert_close(res.heatmaps, (up - lo) / (hi - lo), atol=1e-12, rtol=0)
    if method == "gradcam":  # hand-computed Grad-CAM of the 3-D map
        features = model[:4](x).detach().requires_grad_(True)
        score = model[4:](features).gather(1, res.classes).sum()
        (grad,) = torch.autograd.grad(score, features)
        cams = (grad.mean(dim=(2, 3, 4), keepdim=True) * features).sum(1).relu()
        assert_close(res.cams[:, 0], cams.detach(), atol=1e-12, rtol=1e-10)


# 9. Swin: default layer and gradient methods ----------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "eigengradcam"])
def test_swin_default_layer_is_the_last_norm_and_methods_match(method):
    model, x = small_model("swin"), images(2, 64)  # swin_t's modules at 1/6 of its width
    engine = ce.CAMEngine(model, None, method, input_size=(64, 64))
    assert engine.target_layer == "norm"
    res = engine(x)
    check_against_pgc(res, method, model, "norm", x, lambda t: t.permute(0, 3, 1, 2))
