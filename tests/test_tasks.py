"""Beyond one class per image: segmentation, embeddings and detection against pytorch-grad-cam.

Every model is random-init (``weights=None``) and tiny (64 px or less, float64), shared through
module-scoped fixtures; pytorch-grad-cam runs the same model, layer and target through its hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import calibrate_bn, images
from test_methods import minmax
from torch import Tensor, nn
from torch.testing import assert_close
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)
from torchvision.models.segmentation.fcn import FCN, FCNHead

import cam_engine as ce

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils import model_targets as mt  # noqa: E402

TOL = 1e-5


def pgc_maps(cam_class, model: nn.Module, layer: str, x: Tensor, targets, **kwargs) -> Tensor:
    """pytorch-grad-cam's heatmaps (B, H, W) of ``model`` at ``layer``, min-max normalised once
    more (its ``1e-7`` in the denominator), float64; the model's grads are dropped after."""
    try:
        with cam_class(model, [model.get_submodule(layer)], **kwargs) as cam:
            heat = cam(x, targets)
    finally:
        model.zero_grad(set_to_none=True)
    return minmax(torch.from_numpy(np.asarray(heat)).double())


class Out(nn.Module):
    """pytorch-grad-cam's tutorial wrapper: a segmentation model's ``"out"`` tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m(x)["out"]


# 1. segmentation ---------------------------------------------------------------------------------

SEGMENTERS = {
    # torchvision's FCN class on a resnet18 trunk (fcn_resnet50 itself: test_methods, slow)
    "fcn": (
        lambda: FCN(
            IntermediateLayerGetter(torchvision.models.resnet18(), {"layer4": "out"}),
            FCNHead(512, 5),
        ),
        "backbone.layer3",
    ),
    "deeplabv3": (
        lambda: deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=5, aux_loss=False
        ),
        "backbone.12",
    ),
    "lraspp": (
        lambda: lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5),
        "backbone.12",
    ),
}


@pytest.fixture(scope="module")
def segmenters() -> dict[str, nn.Module]:
    built = {}
    for seed, (name, (build, _)) in enumerate(SEGMENTERS.items()):
        torch.manual_seed(seed)
        built[name] = calibrate_bn(build().double(), images(4, 64, seed=7))
    return built


def _mask() -> Tensor:
    mask = torch.zeros(64, 64)
    mask[16:40, 20:50] = 1
    return mask


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_segmentation_score_matches_pytorch_grad_cam(segmenters, name):
    model, layer = segmenters[name], SEGMENTERS[name][1]
    x, mask = images(2, 64), _mask()
    engine = ce.CAMEngine(model, layer, "gradcam", output="out", input_size=(64, 64))
    res = engine(x, ce.targets.SegmentationScore([2, 4], mask))
    assert res.logits.shape == (2, 5, 64, 64) and torch.equal(res.classes, torch.tensor([[2], [4]]))
    targets = [mt.SemanticSegmentationTarget(c, mask.double().numpy()) for c in (2, 4)]
    expected = pgc_maps(pgc.GradCAM, Out(model), f"m.{layer}", x, targets)
    assert expected.std() > 0.1  # a real map, not a flat one
    assert_close(res.heatmaps[:, 0], expected, atol=TOL, rtol=0)


def test_segeigencam_matches_pytorch_grad_cam(segmenters):
    model, layer = segmenters["deeplabv3"], SEGMENTERS["deeplabv3"][1]
    x, mask = images(2, 64), _mask()
    target = ce.targets.SegmentationScore(1, mask)
    engine = ce.CAMEngine(model, layer, "segeigencam", output="out", input_size=(64, 64))
    res = engine(x, target)
    targets = [mt.SemanticSegmentationTarget(1, mask.double().numpy())] * 2
    expected = pgc_maps(pgc.SegEigenCAM, Out(model), f"m.{layer}", x, targets)
    assert_close(res.heatmaps[:, 0], expected, atol=TOL, rtol=0)
    # eigen_smooth is accepted and ignored, as pytorch-grad-cam does
    smooth = ce.CAMEngine(engine.cam_model, method="segeigencam", eigen_smooth=True)
    assert_close(smooth(x, target).heatmaps, res.heatmaps, atol=1e-12, rtol=0)
    # |g| * A, not g * A: not Eigen-Grad-CAM's map
    eigengrad = ce.CAMEngine(engine.cam_model, method="eigengradcam")(x, target)
    assert not torch.allclose(eigengrad.heatmaps, res.heatmaps, atol=1e-3)


def test_segeigencam_sign_makes_the_larger_extreme_positive():
    from cam_engine.methods.gradient import segeigencam

    # one channel, so the projection is the centred map itself (up to the SVD's sign)
    a = torch.tensor([[[[0.0, 1.0], [1.0, 10.0]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    g = -torch.ones(1, 1, 1, 2, 2, dtype=torch.float64)
    centred = a[0, 0] - a.mean()  # [-3, -2, -2, 7]: |max| > |min|
    assert_close(segeigencam(a, g)[0, 0], centred.relu(), atol=1e-12, rtol=0)
    assert_close(segeigencam(-a, g)[0, 0], centred.relu(), atol=1e-12, rtol=0)


# 2. embeddings -----------------------------------------------------------------------------------


class SimilarityToConceptTarget:
    """pytorch-grad-cam's embeddings tutorial target (not in its package): cosine similarity of
    one image's embedding to a concept embedding."""

    def __init__(self, features: Tensor) -> None:
        self.features = features

    def __call__(self, model_output: Tensor) -> Tensor:
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


@pytest.fixture(scope="module")
def embedder() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12),
    ).double()  # fmt: skip
    return calibrate_bn(model, images(8, 16, seed=5))


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_similarity_score_matches_pytorch_grad_cam(embedder, method):
    x = images(2, 16)
    with torch.no_grad():
        concepts = embedder(images(2, 16, seed=9))  # embeddings of two other images
    engine = ce.CAMEngine(embedder, "5", method)
    cls = {"gradcam": pgc.GradCAM, "layercam": pgc.LayerCAM}[method]
    for concept, per_image in ((concepts[0], [concepts[0]] * 2), (concepts, list(concepts))):
        res = engine(x, ce.targets.SimilarityScore(concept))
        assert torch.equal(res.classes, torch.full((2, 1), -1))
        targets = [SimilarityToConceptTarget(c) for c in per_image]
        expected = pgc_maps(cls, embedder, "5", x, targets)
        assert expected.std() > 0.1
        assert_close(res.heatmaps[:, 0], expected, atol=TOL, rtol=0)
    # the concept matters: the other image's concept gives another map
    other = engine(x, ce.targets.SimilarityScore(concepts[1])).heatmaps
    assert not torch.allclose(
        other[0], engine(x, ce.targets.SimilarityScore(concepts[0])).heatmaps[0], atol=1e-3
    )


def test_similarity_score_rejects_bad_concepts(embedder):
    engine = ce.CAMEngine(embedder, "5")
    x = images(2, 16)
    for concept, message in (
        (torch.ones(5, dtype=torch.float64), "D = 12"),
        (torch.ones(3, 12, dtype=torch.float64), "does not fit a batch of 2"),
        (torch.ones(12, dtype=torch.long), "float"),
    ):
        with pytest.raises(ValueError, match=message):
            engine(x, ce.targets.SimilarityScore(concept))
