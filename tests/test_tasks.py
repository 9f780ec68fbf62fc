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
from test_methods import minmax, signed_projection, upsample_minmax
from torch import Tensor, nn
from torch.testing import assert_close
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)
from torchvision.models.segmentation.fcn import FCN, FCNHead

import cam_engine as ce
from cam_engine import compat
from cam_engine.detection import detector, pack_detections

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
    # the same through cam_engine.compat, pytorch-grad-cam's class and targets; eigen_smooth is
    # accepted and ignored there, as in pytorch-grad-cam (the map is a projection already)
    wrapped = Out(model)
    with compat.SegEigenCAM(
        model=wrapped, target_layers=[wrapped.get_submodule(f"m.{layer}")]
    ) as cam:
        smooth = cam(x, targets, eigen_smooth=True)
    assert_close(torch.from_numpy(smooth).double(), expected, atol=TOL, rtol=0)


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
        (torch.full((12,), float("nan"), dtype=torch.float64), "NaN or inf"),
    ):
        with pytest.raises(ValueError, match=message):
            engine(x, ce.targets.SimilarityScore(concept))


# 3. detection ------------------------------------------------------------------------------------

FPN = "backbone.fpn.layer_blocks.0"  # the finest FPN level: 4x4 at 128 px


@pytest.fixture(scope="module")
def frcnn() -> nn.Module:
    """Faster R-CNN (mobilenet_v3_large_320_fpn, 5 classes) at 128 px, 20 proposals per image
    (the box head's cost), every detection kept.

    The backbone's BatchNorm is calibrated and the box predictor's init widened, so that the
    detections have distinct boxes and unsaturated scores (0.7-0.95): the gradient of
    pytorch-grad-cam's box score is then far from the ties where it is numerical noise.
    """
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=128,
        box_score_thresh=0.0, rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=20,
        box_detections_per_img=20,
    )  # fmt: skip
    calibrate_bn(model.backbone.body, torch.randn(4, 3, 128, 128))
    nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.02)
    nn.init.normal_(model.roi_heads.box_predictor.bbox_pred.weight, std=0.02)
    return model.double().eval()


def _pictures() -> Tensor:
    return torch.rand(
        2, 3, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )


def test_pack_detections_pads_ragged_outputs():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 3.0, 3.0]])
    out = [
        {"boxes": boxes, "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([3, 1])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()},
    ]
    packed = pack_detections(out)
    assert packed.shape == (2, 2, 6)
    assert_close(packed[0], torch.tensor([[1.0, 2, 5, 6, 0.9, 3], [0, 0, 3, 3, 0.4, 1]]))
    assert_close(packed[1], torch.tensor([[0.0, 0, 0, 0, 0, -1]] * 2))
    with pytest.raises(ValueError, match="one dict"):
        pack_detections(torch.zeros(2, 6))


def _detections(seed: int, count: int) -> dict[str, Tensor]:
    """``count`` random detections in a 64 px image, as a torchvision detector returns them."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=g, dtype=torch.float64) * 40
    size = 4 + torch.rand(count, 2, generator=g, dtype=torch.float64) * 20
    return {
        "boxes": torch.cat([corner, corner + size], 1),
        "scores": torch.rand(count, generator=g, dtype=torch.float64).sort(descending=True)[0],
        "labels": torch.randint(1, 4, (count,), generator=g),
    }


def test_box_score_equals_pytorch_grad_cams_target():
    found = [_detections(0, 12), _detections(1, 7), _detections(2, 0)]  # ragged, one empty
    packed = pack_detections(found)
    rows = torch.arange(3)
    # each image's first two detections, moved a little, and boxes that match nothing
    shift = torch.tensor([1.5, -1.0, 0.5, 2.0], dtype=torch.float64)
    boxes = [found[0]["boxes"][:2] + shift, found[1]["boxes"][:3] - shift / 4, torch.ones(1, 4)]
    boxes[2][0, 2:] = 30
    labels = [found[0]["labels"][:2], torch.tensor([found[1]["labels"][0], 0, 1]), [2]]
    for threshold in (0.8, 0.5):  # the checks after the loop read 0.5's
        per_box = ce.targets.BoxScore(labels, boxes, threshold, per_box=True)
        got = per_box.resolve(packed).scores(packed, rows)  # (3, 3): padded with zeros
        summed = ce.targets.BoxScore(labels, boxes, threshold).resolve(packed).scores(packed, rows)
        for i in range(3):
            for k in range(len(boxes[i])):
                one = labels[i][k : k + 1], boxes[i][k : k + 1]
                target = mt.FasterRCNNBoxScoreTarget(*one, threshold)
                assert_close(got[i, k], target(found[i])[0], atol=1e-12, rtol=0)
            assert not got[i, len(boxes[i]) :].any()
            whole = mt.FasterRCNNBoxScoreTarget(labels[i], boxes[i], threshold)(found[i])
            assert_close(summed[i, 0], whole[0], atol=1e-12, rtol=0)
    assert got[0, :2].all() and got[1, 0] > 0 and not got[1, 1:].any()  # matches and misses
    assert torch.equal(
        per_box.resolve(packed).classes,
        torch.tensor([[*labels[0], -1], [*labels[1].tolist()], [2, -1, -1]]),
    )
    # boxes (B, n, 4) as one tensor with labels as a list of tensors, as a detector gives them
    two = [found[i]["boxes"][:2] for i in range(2)], [found[i]["labels"][:2] for i in range(2)]
    stacked = ce.targets.BoxScore(two[1], torch.stack(two[0]), per_box=True)
    listed = ce.targets.BoxScore(*reversed(two), per_box=True)
    assert_close(
        stacked.resolve(packed[:2]).scores(packed[:2], rows[:2]),
        listed.resolve(packed[:2]).scores(packed[:2], rows[:2]),
    )
    # targets=None: each image's top-scoring detection (none: a zero score)
    top = ce.targets.resolve(None, packed)
    assert_close(
        top.scores(packed, rows)[:, 0],
        torch.stack(
            [
                1 + found[0]["scores"][0],
                1 + found[1]["scores"][0],
                torch.tensor(0.0, dtype=torch.float64),
            ]
        ),
    )


def test_box_score_rejects_bad_boxes():
    packed = pack_detections([_detections(0, 5), _detections(1, 5)])
    box = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    for target, message in (
        (ce.targets.BoxScore([1], torch.tensor([[10.0, 10.0, 5.0, 40.0]])), "x2 > x1"),
        (ce.targets.BoxScore([1, 2], box), "one integer label per box"),
        (ce.targets.BoxScore([[1], [2], [3]], box.expand(3, 1, 4)), "batch of 2"),
        (ce.targets.BoxScore([[1], [2, 3]], [box, box]), "one label per box"),
        (
            ce.targets.BoxScore(
                [torch.tensor([1]), torch.tensor([2, 3])], box[None].expand(2, 1, 4)
            ),
            "one integer label per box",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            target.resolve(packed)
    for threshold in (float("nan"), 1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="iou_threshold must be"):
            ce.targets.BoxScore([1], box, threshold)
    with pytest.raises(ValueError, match="per_box must be"):
        ce.targets.BoxScore([1], box, per_box="yes")
    with pytest.raises(ValueError, match="BoxScore needs detections"):
        ce.targets.BoxScore([1], box).resolve(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="no default target layer"):
        detector(nn.Identity())


@pytest.mark.parametrize(
    ("method", "cam_class"), [("gradcam", "GradCAM"), ("layercam", "LayerCAM")]
)
def test_gradient_methods_on_box_scores_match_pytorch_grad_cam(frcnn, method, cam_class):
    x = _pictures()
    with torch.no_grad():
        found = frcnn(x)
    # the first two detections of each image, moved by a few pixels (IoU about 0.9)
    shift = torch.tensor([2.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    boxes = [d["boxes"][:2] + shift for d in found]
    labels = [d["labels"][:2] for d in found]
    res = ce.CAMEngine(detector(frcnn, FPN), method=method)(x, ce.targets.BoxScore(labels, boxes))
    assert res.cams.shape == (2, 1, 4, 4) and res.logits.shape[::2] == (2, 6)
    targets = [
        mt.FasterRCNNBoxScoreTarget(lab, box) for lab, box in zip(labels, boxes, strict=True)
    ]
    expected = pgc_maps(getattr(pgc, cam_class), frcnn, FPN, x, targets)
    assert expected.std() > 0.1
    assert_close(res.heatmaps[:, 0], expected, atol=TOL, rtol=0)


def test_eigencam_on_the_fpn_matches_pytorch_grad_cam(frcnn):
    x = _pictures()
    engine = ce.CAMEngine(detector(frcnn), method="eigencam")
    assert engine.target_layer == FPN  # the default layer: the finest FPN level
    res = engine(x)  # None: each image's top detection (Eigen-CAM does not read it)

    class Raw(pgc.EigenCAM):  # its projection, before the ReLU: its sign is the BLAS's
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    feats = {}
    hook = frcnn.get_submodule(FPN).register_forward_hook(lambda m, i, o: feats.update(a=o))
    try:
        with Raw(frcnn, [frcnn.get_submodule(FPN)]) as cam:
            cam(x, [lambda out: out["scores"][0]] * 2)
    finally:
        hook.remove()
        frcnn.zero_grad(set_to_none=True)
    raw = torch.from_numpy(np.asarray(cam.raw)).double()
    expected = upsample_minmax(signed_projection(raw, feats["a"].detach().sum(1)), (128, 128))
    assert_close(res.heatmaps[:, 0], expected, atol=TOL, rtol=0)


def test_cli_detect_draws_each_detection_with_its_map(tmp_path, monkeypatch):
    from PIL import Image

    from cam_engine.cli import main

    g = torch.Generator().manual_seed(4)
    picture = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(picture).save(tmp_path / "street.png")
    torch.manual_seed(0)  # a small detector (64 px, 20 proposals), random weights
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=64, max_size=64,
        rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=20,
    ).eval()  # fmt: skip
    built = []
    monkeypatch.setattr(
        torchvision.models, "get_model", lambda name, **kw: built.append((name, kw)) or model
    )
    argv = ["detect", str(tmp_path / "street.png"), "--input-size", "64", "--out", str(tmp_path)]
    assert main([*argv, "--score-threshold", "0", "--max-detections", "2"]) == 0
    assert built == [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {"weights": None, "weights_backbone": None})
    ]
    rows = (tmp_path / "detections.csv").read_text().splitlines()
    assert rows[0] == "image,k,class_id,class_name,score,x1,y1,x2,y2" and len(rows) == 3
    for k in range(2):
        with Image.open(tmp_path / f"street.{k}.png") as drawn:
            assert drawn.size == (64, 64) and drawn.mode == "RGB"
    # the rows are the detector's own best two detections of the resized image
    x = torchvision.transforms.functional.resize(
        torch.from_numpy(picture).permute(2, 0, 1), [64, 64]
    )
    with torch.no_grad():
        found = model((x / 255)[None])[0]
    for k, row in enumerate(rows[1:]):
        label = int(found["labels"][k])
        assert row.split(",")[:4] == [
            str(tmp_path / "street.png"),
            str(k),
            str(label),
            f"class {label}",
        ]
        values = torch.tensor([float(v) for v in row.split(",")[4:]])
        expected = torch.cat([found["scores"][k : k + 1], found["boxes"][k]])
        assert_close(values, expected, atol=0.06, rtol=0)  # the CSV's 4 and 1 decimals
    # nothing above the threshold: nothing explained, exit status 1
    assert main([*argv, "--score-threshold", "1"]) == 1


def test_default_detector_layers():
    from cam_engine.detection import default_layer

    def detector_like(features: nn.Module) -> nn.Module:
        model = nn.Module()
        model.backbone = nn.Module()
        model.backbone.features = features
        return model

    conv = nn.Conv2d(3, 4, 3)
    # SSDlite runs its stages one by one; SSD (VGG) runs its features whole
    assert default_layer(detector_like(nn.Sequential(nn.Sequential(conv)))) == "backbone.features.0"
    assert default_layer(detector_like(nn.Sequential(conv, nn.ReLU()))) == "backbone.features"
    with_fpn = detector_like(nn.Sequential(conv))
    with_fpn.backbone.fpn = nn.Module()
    with_fpn.backbone.fpn.layer_blocks = nn.ModuleList([nn.Conv2d(4, 4, 3)])
    assert default_layer(with_fpn) == "backbone.fpn.layer_blocks.0"
    with pytest.raises(ValueError, match="no default target layer"):
        default_layer(nn.Sequential(conv))
