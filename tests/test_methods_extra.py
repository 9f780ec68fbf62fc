"""The peer libraries' extra methods against the library that defines each (float64, CPU), and
ConvNeXt / MaxViT with every gradient method.

Oracles: pytorch-grad-cam 1.5.7 (``fem``, ``kpca-cam``, ``shapleycam``, ``finercam``) and
torchcam 0.5 (``smoothgradcam++``, ``sscam``, ``iscam``). The noise-based ones get the same noise
on both sides: ours from a seeded ``torch.Generator`` (``method_options``), torchcam's by
replacing its ``_distrib`` with a sampler drawing from an identically seeded generator.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_model, small_model
from test_methods import HEATMAP_TOL, minmax
from torch import Tensor, nn
from torch.testing import assert_close

import cam_engine as ce

pgc = pytest.importorskip("pytorch_grad_cam")
tc = pytest.importorskip("torchcam.methods")
from pytorch_grad_cam.utils import model_targets as mt  # noqa: E402

GRADIENT_METHODS = [
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "gradcam-elementwise",
    "eigengradcam",
    "shapleycam",
    "finercam",
    "smoothgradcam++",
]


@functools.cache
def built(name: str, size: int = 64):
    return make_model(name, size=size)


def pgc_maps(cls, model, layer, x, classes=None, **init) -> Tensor:
    """A pytorch-grad-cam class's heatmaps (B, H, W), min-max normalised once more, float64."""
    targets = None if classes is None else [mt.ClassifierOutputTarget(int(c)) for c in classes]
    try:
        with cls(model, [model.get_submodule(layer)], **init) as cam:
            heat = cam(x, targets)
            # ShapleyCAM keeps graph-carrying gradient views that its release() cannot detach_;
            # FinerCAM holds its hooks in the base method it wraps
            getattr(cam, "base_cam", cam).activations_and_grads.gradients = []
    finally:
        model.zero_grad(set_to_none=True)
    return minmax(torch.from_numpy(np.asarray(heat)).double())


# 1. pytorch-grad-cam: FEM, KPCA-CAM, ShapleyCAM, Finer-CAM ----------------------------------------


@pytest.mark.parametrize(("layer", "size"), [("layer3", 64), ("layer2", 64)])
def test_fem_matches_pytorch_grad_cam(resnet18, layer, size):
    x = images(2, size)
    res = ce.CAMEngine(resnet18, layer, "fem")(x, ce.TopK(2))
    assert torch.equal(res.cams[:, 0], res.cams[:, 1])  # class-agnostic
    expected = pgc_maps(pgc.FEM, resnet18, layer, x)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
    k3 = ce.CAMEngine(resnet18, layer, "fem", method_options={"k": 1})(x)
    assert_close(
        k3.heatmaps[:, 0], pgc_maps(pgc.FEM, resnet18, layer, x, k=1), atol=HEATMAP_TOL, rtol=0
    )


@pytest.mark.parametrize(
    ("layer", "size", "kernel"),
    [("layer3", 64, "sigmoid"), ("layer3", 64, "rbf"), ("layer2", 128, "sigmoid")],
)
def test_kpca_cam_matches_pytorch_grad_cam(resnet18, layer, size, kernel):
    """layer2 at 128 px has 256 positions: scikit-learn switches to ARPACK there."""
    x = images(2, size)
    options = {"kernel": kernel}
    res = ce.CAMEngine(resnet18, layer, "kpca-cam", method_options=options)(x)
    expected = pgc_maps(pgc.KPCA_CAM, resnet18, layer, x, kernel=kernel)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


def test_kpca_cam_rejects_unknown_kernel(resnet18):
    with pytest.raises(ValueError, match="unknown kernel 'rbff'"):
        ce.CAMEngine(resnet18, "layer4", "kpca-cam", method_options={"kernel": "rbff"})


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("gradcam", {"k": 2}, r"unknown option\(s\) \['k'\] for method 'gradcam'; valid: none"),
        ("fem", {"kk": 2}, r"unknown option\(s\) \['kk'\] for method 'fem'; valid: k"),
        ("fem", {"k": float("nan")}, "k must be a finite number"),
        ("smoothgradcam++", {"num_samples": 0}, "num_samples must be an int >= 1"),
        ("smoothgradcam++", {"generator": 5}, "generator must be a torch.Generator"),
        ("finercam", {"alpha": float("nan")}, "alpha must be a finite number"),
        ("finercam", {"alpha": float("inf")}, "alpha must be a finite number"),
        ("finercam", {"alpha": True}, "alpha must be a finite number"),
        ("finercam", {"alpha": -1.0}, "alpha must be >= 0"),
        ("finercam", {"comparisons": (1, 1)}, "distinct ranks"),
        ("finercam", {"comparisons": (1, 2.5)}, "int ranks >= 1"),
        ("finercam", {"comparisons": (0,)}, "int ranks >= 1"),
        ("finercam", {"base": "scorecam"}, "gradient method over"),
    ],
)
def test_method_options_are_checked_when_the_engine_is_built(resnet18, method, options, match):
    """Unknown keys used to be ignored by every method but the meta ones, and finercam took a
    NaN or negative alpha (NaN maps) and duplicate or fractional ranks (raw errors)."""
    with pytest.raises(ValueError, match=match):
        ce.CAMEngine(resnet18, "layer4", method, method_options=options)


def test_finercam_default_ranks_fit_a_three_class_model():
    """Both peers drop comparison ranks past the last class; ours used to raise."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).double().eval()
    x = images(2, 16)
    res = ce.CAMEngine(model, "1", "finercam")(x, [0, 2])
    logits = model(x)
    # by hand: ranks 1 and 2 are the other two classes (rank 3 does not exist)
    features = model[1](model[0](x)).detach().requires_grad_(True)
    out = model[4](model[3](model[2](features)))
    scores = []
    for b, c in enumerate([0, 2]):
        others = [d for d in range(3) if d != c]
        probs = out[b].softmax(-1)[others]
        scores.append((probs * (out[b, c] - out[b, others])).sum() / (probs.sum() + 1e-9))
    (grads,) = torch.autograd.grad(torch.stack(scores).sum(), features)
    expected = (grads.mean((2, 3))[..., None, None] * features.detach()).sum(1).relu()
    assert_close(res.cams[:, 0], expected, atol=1e-12, rtol=1e-9)
    assert_close(res.logits, logits.detach(), atol=1e-12, rtol=0)


class CurvedHead(nn.Module):
    """conv -> GELU -> GAP -> linear after the target ``features``: a head whose Hessian times
    ``A`` is not a multiple of the gradient (biases and GELU break homogeneity)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.gelu(self.mix(self.features(x)))
        return self.fc(hidden.mean((2, 3)))


@pytest.mark.parametrize(
    ("name", "layer"),
    [("convnext", "features.5"), ("resnet18", "layer4"), ("curved", "features")],
)
def test_shapleycam_matches_pytorch_grad_cam(name, layer):
    """pytorch-grad-cam's ShapleyCAM fails with a reshape_transform (token maps): CNNs only.

    resnet18's head is piecewise linear (H = 0) and ConvNeXt's starts with a LayerNorm, which is
    scale-invariant in ``A``, so ``H A`` is a multiple of the gradient: both give Grad-CAM's
    heatmaps. The GELU head gives others."""
    torch.manual_seed(0)
    model = {"curved": lambda: CurvedHead().double().eval(), "convnext": lambda: small_model(name),
             "resnet18": lambda: built(name)}[name]()  # fmt: skip
    x = images(2, 64)
    res = ce.CAMEngine(model, layer, "shapleycam")(x)
    expected = pgc_maps(pgc.ShapleyCAM, model, layer, x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
    gradcam = ce.CAMEngine(model, layer, "gradcam")(x, res.classes)
    differs = not torch.allclose(gradcam.heatmaps, res.heatmaps, atol=1e-3)
    assert differs == (name == "curved")


@pytest.mark.parametrize(("name", "layer"), [("resnet18", "layer4"), ("vgg11_bn", "features.27")])
@pytest.mark.parametrize("base", ["gradcam", "layercam"])
def test_finercam_matches_pytorch_grad_cam(request, name, layer, base):
    model, x = request.getfixturevalue(name), images(2, 64)
    res = ce.CAMEngine(model, layer, "finercam", method_options={"base": base})(x)
    assert torch.equal(res.classes[:, 0], res.logits.argmax(1))
    base_cls = {"gradcam": pgc.GradCAM, "layercam": pgc.LayerCAM}[base]
    expected = pgc_maps(pgc.FinerCAM, model, layer, x, base_method=base_cls)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
    plain = ce.CAMEngine(model, layer, base)(x, res.classes)
    assert not torch.allclose(plain.heatmaps, res.heatmaps, atol=1e-3)


def test_finer_scores_by_hand():
    logits = torch.tensor([[3.0, 2.9, 0.0, 2.5, 3.2, -1.0]], dtype=torch.float64)
    got = ce.methods.finer_scores(logits, torch.tensor([[0, 5]]), 0.5, (1, 2))
    p = logits[0].softmax(0)
    y = logits[0]
    # class 0: closest are 4 (0.2) then 2.9 (0.1) -> ranks 1, 2 = classes 1, 4
    c0 = (p[1] * (y[0] - 0.5 * y[1]) + p[4] * (y[0] - 0.5 * y[4])) / (p[1] + p[4] + 1e-9)
    # class 5 (-1.0): closest are 2 (0.0) then 3 (2.5)
    c5 = (p[2] * (y[5] - 0.5 * y[2]) + p[3] * (y[5] - 0.5 * y[3])) / (p[2] + p[3] + 1e-9)
    assert_close(got, torch.stack([c0, c5])[None], atol=1e-12, rtol=0)


def test_finercam_rejects_score_functions(resnet18):
    engine = ce.CAMEngine(resnet18, "layer4", "finercam")
    with pytest.raises(ValueError, match="class-id targets"):
        engine(images(1, 64), lambda out: out[:, :1])


# 2. torchcam: Smooth Grad-CAM++, SS-CAM, IS-CAM ---------------------------------------------------


class SameNoise:
    """Stands for torchcam's ``_distrib`` (``Normal(0, std).sample``: float32, the same numbers as
    ``randn * std``), drawn from a generator of its own."""

    def __init__(self, seed: int, std: float) -> None:
        self.generator, self.std = torch.Generator().manual_seed(seed), std

    def sample(self, shape) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator) * self.std


def torchcam_cams(cls, model, layer, x, classes, noise=None, **init) -> Tensor:
    """torchcam's raw maps (B, h, w) (ReLU'd, not normalised) for one class per image."""
    try:
        with cls(model, layer, **init) as extractor:
            if noise is not None:
                extractor._distrib = noise
            with torch.enable_grad():
                scores = model(x)
            (cams,) = extractor([int(c) for c in classes], scores, normalized=False)
    finally:
        model.zero_grad(set_to_none=True)
    return cams.detach()


@pytest.mark.parametrize(("name", "layer"), [("resnet18", "layer4"), ("vgg11_bn", "features.27")])
def test_smoothgradcampp_matches_torchcam(request, name, layer):
    """resnet18: closed-form gradients on the GAP head; vgg11_bn: backward through the head."""
    model, x = request.getfixturevalue(name), images(2, 64)
    options = {"num_samples": 3, "std": 0.3, "generator": torch.Generator().manual_seed(5)}
    res = ce.CAMEngine(model, layer, "smoothgradcam++", method_options=options)(x, [1, 7])
    noise = SameNoise(5, 0.3)
    expected = torchcam_cams(tc.SmoothGradCAMpp, model, layer, x, [1, 7], noise, num_samples=3)
    assert expected.amax() > 0
    assert_close(res.cams[:, 0], expected, atol=1e-10 * expected.abs().max(), rtol=1e-7)


@pytest.mark.parametrize("method", ["sscam", "iscam"])
def test_sscam_iscam_match_torchcam(resnet18, method):
    x, layer, samples = images(2, 32), "layer1", 3
    options = {"num_samples": samples}
    if method == "sscam":  # IS-CAM draws no noise
        options["generator"] = torch.Generator().manual_seed(9)
    # chunks of 37 of the 2 x 64 masks: the noise is still one draw per pass, as torchcam's
    engine = ce.CAMEngine(resnet18, layer, method, batch_size=37, method_options=options)
    res = engine(x, [4, 2])
    cls = {"sscam": tc.SSCAM, "iscam": tc.ISCAM}[method]
    noise = SameNoise(9, 2.0) if method == "sscam" else None
    expected = torchcam_cams(
        cls, resnet18, layer, x, [4, 2], noise, batch_size=256, num_samples=samples
    )
    assert expected.amax() > 0
    assert_close(res.cams[:, 0], expected, atol=1e-10 * expected.abs().max(), rtol=1e-7)


def test_noise_methods_are_reproducible_with_a_generator(resnet18):
    x = images(1, 64)

    def run(seed):
        options = {"num_samples": 2, "generator": torch.Generator().manual_seed(seed)}
        return ce.CAMEngine(resnet18, "layer4", "smoothgradcam++", method_options=options)(x).cams

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# 3. ConvNeXt and MaxViT with every gradient method -----------------------------------------------


def check_family(model, x, layer, size):
    wrapped = ce.wrap(model, None, input_size=size)
    assert wrapped.target_layer == layer
    noise = {"num_samples": 2, "generator": torch.Generator().manual_seed(0)}
    for method in GRADIENT_METHODS:
        options = noise if method == "smoothgradcam++" else None
        res = ce.CAMEngine(wrapped, method=method, method_options=options)(x, ce.TopK(2))
        b, k = x.shape[0], 2
        assert res.cams.shape[:2] == (b, k) and res.heatmaps.shape == (b, k, *size), method
        assert torch.isfinite(res.cams).all() and (res.cams >= 0).all(), method
        assert res.heatmaps.min() >= 0 and res.heatmaps.max() <= 1, method
        assert (res.heatmaps.flatten(2).amax(-1) == 1).all(), method  # no map is all zeros
        if method == "gradcam":  # the target map is NCHW for both: no reshape_transform
            expected = pgc_maps(pgc.GradCAM, model, layer, x, res.classes[:, 0])
            got = res.heatmaps[:, 0].to(expected.dtype)
            assert_close(got, expected, atol=HEATMAP_TOL, rtol=0)


def test_convnext_with_every_gradient_method():
    check_family(small_model("convnext"), images(2, 64), "features", (64, 64))


def test_maxvit_with_every_gradient_method():
    """torchvision's MaxVit with 2x2 windows at 64 px; its last block ends inside its
    ``grid_attention`` layer, whose output is the default map (not the MBConv before it)."""
    check_family(small_model("maxvit"), images(2, 64), "blocks.1", (64, 64))
