"""Parity of the engine with independent implementations of CAM / Grad-CAM.

Oracles: pytorch-grad-cam, captum, torchcam, the hook-based ``cam_engine.reference`` and closed
forms written out here (einsum of FC rows with a forward-hook capture of the target map). Every
comparison runs in float64 on calibrated random-init torchvision models.

pytorch-grad-cam min-max normalises each map at the feature map's resolution and resizes it
afterwards (cv2, float32), while the library resizes first and normalises the full-resolution map.
Bilinear resizing is linear and keeps constants, so both are positive affine images of the same
upsampled map: one more min-max of pytorch-grad-cam's output gives the library's rule exactly, up to
float32 rounding. Its raw float64 low-resolution map is compared as well.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_model
from torch import Tensor, nn
from torch.testing import assert_close

import cam_engine as ce
from cam_engine.reference import reference_cam, reference_gradcam

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

HEATMAP_TOL = 1e-4  # pytorch-grad-cam resizes and returns float32
CAM_TOL = 1e-10  # float64, different summation orders


class Arch(NamedTuple):
    name: str
    layer: str
    fc: str | None = None  # the linear layer of a global-average-pool -> linear head
    size: int = 64


ARCHS = [
    Arch("resnet18", "layer4", "fc"),
    Arch("vgg11_bn", "features.27"),  # last ReLU: 4x4 at 64x64 (the max-pool after it is 2x2)
    # not "features": densenet applies an in-place ReLU to it, which corrupts the view that
    # pytorch-grad-cam's forward hook keeps on the CPU
    Arch("densenet121", "features.denseblock4"),
    Arch("mobilenet_v2", "features", "classifier.1"),
    Arch("mobilenet_v3_small", "features"),
    Arch("efficientnet_b0", "features", "classifier.1"),
    Arch("shufflenet_v2_x0_5", "conv5", "fc"),
    Arch("regnet_x_400mf", "trunk_output", "fc"),
    Arch("squeezenet1_1", "features"),
    Arch("googlenet", "inception5b", "fc"),
    Arch("convnext_tiny", "features"),
    Arch("inception_v3", "Mixed_7c", "fc", size=139),  # 3x3 map; needs inputs >= 75
]
SLOW = {"densenet121", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "inception_v3"}


def arch_params(archs=ARCHS):
    marks = {name: [pytest.mark.slow] for name in SLOW}
    return [pytest.param(a, id=a.name, marks=marks.get(a.name, [])) for a in archs]


GAP_ARCHS = arch_params([a for a in ARCHS if a.fc])


@functools.cache
def _built(name: str, size: int) -> nn.Module:
    return make_model(name, size=size)


@pytest.fixture
def get_model(request):
    """Models built once per session; resnet18 / vgg11_bn are conftest's session fixtures."""

    def get(arch: Arch) -> nn.Module:
        if arch.name in ("resnet18", "vgg11_bn") and arch.size == 64:
            return request.getfixturevalue(arch.name)
        return _built(arch.name, arch.size)

    return get


def minmax(maps: Tensor) -> Tensor:
    """Per-map min-max over the last two dims; every map must be non-constant."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    assert (span > 0).all(), "a constant map would make the comparison vacuous"
    return (maps - lo) / span


def upsample_minmax(cams: Tensor, size) -> Tensor:
    return minmax(F.interpolate(cams, size=size, mode="bilinear", align_corners=False))


def capture(model: nn.Module, layer: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, a copy of ``layer``'s output) of a plain forward with a hook of our own."""
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: store.setdefault("a", out.detach().clone())
    )
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return logits, store["a"]


class _RawGradCAM(pgc.GradCAM):
    """pytorch-grad-cam's Grad-CAM, also keeping its float64 map before ReLU and scaling."""

    def get_cam_image(self, *args, **kwargs):
        self.raw = super().get_cam_image(*args, **kwargs)
        return self.raw


def pgc_gradcam(model, layer, x, classes, reshape_transform=None) -> tuple[Tensor, Tensor]:
    """pytorch-grad-cam for one class per image: (heatmaps (B, H, W), cams (B, h, w))."""
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    module = model.get_submodule(layer)
    try:
        with _RawGradCAM(model, [module], reshape_transform=reshape_transform) as cam:
            heat = cam(x, targets)
            raw = cam.raw
    finally:
        model.zero_grad(set_to_none=True)  # models are shared with other tests
    return minmax(torch.from_numpy(heat).double()), torch.from_numpy(raw).clamp_min(0)


# 1. Grad-CAM == pytorch-grad-cam ----------------------------------------------------------------


@pytest.mark.parametrize("arch", arch_params())
def test_gradcam_matches_pytorch_grad_cam(get_model, arch):
    model, x = get_model(arch), images(2, arch.size)
    res = ce.CAMEngine(model, arch.layer, "gradcam")(x)
    heat, cams = pgc_gradcam(model, arch.layer, x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], heat, atol=HEATMAP_TOL, rtol=0)
    assert_close(res.cams[:, 0], cams, atol=CAM_TOL, rtol=1e-8)


def test_gradcam_matches_pytorch_grad_cam_non_square(resnet18):
    x = images(2, (64, 128))  # a (2, 4) map: catches H / W swaps in upsampling or layout
    res = ce.CAMEngine(resnet18, "layer4")(x)
    heat, cams = pgc_gradcam(resnet18, "layer4", x, res.classes[:, 0])
    assert res.heatmaps.shape == (2, 1, 64, 128)
    assert_close(res.heatmaps[:, 0], heat, atol=HEATMAP_TOL, rtol=0)
    assert_close(res.cams[:, 0], cams, atol=CAM_TOL, rtol=1e-8)


# 2. CAM == closed form written out here, == Grad-CAM after normalisation ------------------------


@pytest.mark.parametrize("arch", GAP_ARCHS)
def test_cam_matches_fc_einsum_and_pytorch_grad_cam(get_model, arch):
    model, x = get_model(arch), images(2, arch.size)
    res = ce.CAMEngine(model, arch.layer, "cam")(x, ce.TopK(3))
    logits, features = capture(model, arch.layer, x)
    weight = model.get_submodule(arch.fc).weight.detach()
    expected = torch.einsum("bkc,bchw->bkhw", weight[logits.topk(3).indices], features).relu()
    assert_close(res.cams, expected, atol=CAM_TOL, rtol=0)
    assert_close(res.heatmaps, upsample_minmax(expected, x.shape[2:]), atol=CAM_TOL, rtol=0)
    # CAM = h*w * Grad-CAM on these heads: the same heatmaps
    heat, _ = pgc_gradcam(model, arch.layer, x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], heat, atol=HEATMAP_TOL, rtol=0)


# 3. closed form == autograd ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch",
    arch_params([a for a in ARCHS if a.name in ("resnet18", "mobilenet_v2", "efficientnet_b0")]),
)
def test_closed_form_equals_autograd(get_model, arch):
    model, x = get_model(arch), images(2, arch.size)
    fast = ce.CAMEngine(model, arch.layer, closed_form=True)
    slow = ce.CAMEngine(model, arch.layer, closed_form=False)
    assert fast.model.gap_linear is not None  # else both would take the autograd path
    a, b = fast(x, ce.TopK(3)), slow(x, ce.TopK(3))
    assert torch.equal(a.classes, b.classes)
    assert_close(a.logits, b.logits, atol=1e-12, rtol=1e-12)
    assert_close(a.cams, b.cams, atol=CAM_TOL, rtol=0)
    assert_close(a.heatmaps, b.heatmaps, atol=1e-8, rtol=0)


def test_cam_with_closed_form_off_equals_closed_form(resnet18):
    x = images(2, 64)
    a = ce.CAMEngine(resnet18, "layer4", "cam")(x, ce.TopK(2))
    b = ce.CAMEngine(resnet18, "layer4", "cam", closed_form=False)(x, ce.TopK(2))
    assert_close(a.cams, b.cams, atol=CAM_TOL, rtol=0)


# 4. K maps in one call == K single-class calls --------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])  # closed form / backward through an MLP
@pytest.mark.parametrize(
    "targets",
    [ce.TopK(3), ce.BottomK(2), torch.tensor([[3, 3, 500], [999, 0, 7]])],
    ids=["top3", "bottom2", "BxK"],
)
def test_k_targets_equal_single_class_calls(request, name, targets):
    model, x = request.getfixturevalue(name), images(2, 64)
    engine = ce.CAMEngine(model, None if name == "resnet18" else "features.27")
    res = engine(x, targets)
    with torch.no_grad():
        logits = model(x)
    if isinstance(targets, Tensor):
        expected = targets
    else:
        expected = logits.topk(targets.k, largest=isinstance(targets, ce.TopK)).indices
    assert torch.equal(res.classes, expected)
    assert_close(res.logits, logits, atol=1e-12, rtol=1e-12)
    for k in range(res.classes.shape[1]):
        single = engine(x, res.classes[:, k].tolist())
        assert_close(res.cams[:, k : k + 1], single.cams, atol=1e-12, rtol=1e-12)
        assert_close(res.heatmaps[:, k : k + 1], single.heatmaps, atol=1e-10, rtol=0)
    # duplicated classes give identical maps
    if isinstance(targets, Tensor):
        assert torch.equal(res.cams[0, 0], res.cams[0, 1])


# 5. == the hook-based reference -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("resnet18", "layer4"),
        ("vgg11_bn", "features.28"),
    ],
)
def test_gradcam_matches_hook_reference(request, name, layer):
    model, x = request.getfixturevalue(name), images(2, 64)
    res = ce.CAMEngine(model, layer)(x, ce.TopK(2))
    ref = reference_gradcam(model, model.get_submodule(layer), x, res.classes)
    assert torch.equal(res.classes, ref.classes)
    assert_close(res.logits, ref.logits, atol=1e-12, rtol=1e-12)
    assert_close(res.cams, ref.cams, atol=1e-8, rtol=0)
    assert_close(res.heatmaps, ref.heatmaps, atol=1e-8, rtol=0)


def test_reference_documents_its_in_place_limit_and_engine_has_none(vgg11_bn):
    """A full backward hook on an in-place ReLU fails (HookGradCAM's docstring says so); the
    engine explains the same layer (checked against pytorch-grad-cam above)."""
    x = images(2, 64)
    with pytest.raises(RuntimeError, match="modified inplace"):
        reference_gradcam(vgg11_bn, vgg11_bn.features[27], x)
    assert torch.isfinite(ce.CAMEngine(vgg11_bn, "features.27")(x).cams).all()


def test_cam_matches_hook_reference(resnet18):
    x = images(2, 64)
    res = ce.CAMEngine(resnet18, "layer4", "cam")(x, ce.BottomK(2))
    ref = reference_cam(resnet18, resnet18.layer4, resnet18.fc, x, res.classes)
    assert_close(res.cams, ref.cams, atol=1e-8, rtol=0)
    assert_close(res.heatmaps, ref.heatmaps, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    ("name", "layer", "param"),
    [("resnet18", "layer4", "fc.weight"), ("vgg11_bn", "features.28", "classifier.0.weight")],
)
def test_engine_follows_in_place_weight_updates(request, name, layer, param):
    """An optimiser step after the engine is built must be seen (shared, not copied, weights)."""
    model, x = request.getfixturevalue(name), images(2, 64)
    engine = ce.CAMEngine(model, layer)
    engine(x)
    weight = model.get_parameter(param)
    try:
        with torch.no_grad():
            weight.mul_(-1)
        res = engine(x, ce.TopK(2))
        ref = reference_gradcam(model, model.get_submodule(layer), x, res.classes)
    finally:
        with torch.no_grad():
            weight.mul_(-1)  # exact: the fixture is shared
    assert_close(res.logits, ref.logits, atol=1e-12, rtol=1e-12)
    assert_close(res.cams, ref.cams, atol=1e-8, rtol=0)


# 6. wrap: logits == model(x), features == a forward hook's capture ------------------------------


@pytest.mark.parametrize("arch", arch_params())
def test_wrap_matches_model_and_forward_hook(get_model, arch):
    model, x = get_model(arch), images(2, arch.size)
    logits, features = capture(model, arch.layer, x)
    with torch.no_grad():
        got_logits, got_features = ce.wrap(model, arch.layer, channels_last=False)(x)
        fast_logits, fast_features = ce.wrap(model, arch.layer)(x)  # channels-last trunk input
    assert_close(got_logits, logits, atol=1e-12, rtol=1e-12)
    assert_close(got_features, features, atol=1e-12, rtol=1e-12)
    # other convolution kernels, other float64 rounding
    assert_close(fast_logits, logits, atol=1e-9, rtol=1e-9)
    assert_close(fast_features, features, atol=1e-9, rtol=1e-9)


# 7. captum LayerGradCam -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "layer"), [("resnet18", "layer4"), ("vgg11_bn", "features.27")])
def test_gradcam_matches_captum(request, name, layer):
    attr = pytest.importorskip("captum.attr")
    model, x = request.getfixturevalue(name), images(2, 64)
    res = ce.CAMEngine(model, layer)(x, ce.TopK(2))
    explainer = attr.LayerGradCam(model, model.get_submodule(layer))
    try:
        expected = torch.cat(
            [explainer.attribute(x, target=c, relu_attributions=True) for c in res.classes.T], 1
        )
    finally:
        model.zero_grad(set_to_none=True)
    assert_close(res.cams, expected.detach(), atol=1e-8, rtol=0)


# 8. torchcam GradCAM ----------------------------------------------------------------------------


def test_gradcam_matches_torchcam(resnet18):
    methods = pytest.importorskip("torchcam.methods")
    x = images(2, 64)
    res = ce.CAMEngine(resnet18, "layer4")(x, ce.TopK(2))
    expected = []
    try:
        with methods.GradCAM(resnet18, "layer4") as extractor:
            for c in res.classes.T:
                scores = resnet18(x)  # torchcam hooks the forward, then backpropagates `scores`
                (cam,) = extractor(class_idx=c.tolist(), scores=scores, normalized=False)
                expected.append(cam)
    finally:
        resnet18.zero_grad(set_to_none=True)
    assert_close(res.cams, torch.stack(expected, 1), atol=1e-8, rtol=0)


# 9. transformers: token maps (ViT) and channels-last maps (Swin) --------------------------------


def _vit_tokens(t: Tensor) -> Tensor:
    return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)


def _nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "layer", "reshape", "transform"),
    [
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "vit", _vit_tokens),
        ("swin_t", "norm", "swin", _nhwc),
    ],
)
@pytest.mark.parametrize("inferred", [False, True], ids=["explicit", "inferred"])
def test_transformer_gradcam_matches_pytorch_grad_cam(name, layer, reshape, transform, inferred):
    model, x = _built(name, 64), images(2, 64)
    engine = ce.CAMEngine(model, layer, reshape=None if inferred else reshape)
    res = engine(x)
    heat, cams = pgc_gradcam(model, layer, x, res.classes[:, 0], reshape_transform=transform)
    assert res.cams.shape[2:] == cams.shape[1:]
    assert_close(res.heatmaps[:, 0], heat, atol=HEATMAP_TOL, rtol=0)
    assert_close(res.cams[:, 0], cams, atol=CAM_TOL, rtol=1e-8)
