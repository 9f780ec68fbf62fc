"""The shapes data set, the shipped ShapesNet, its localisation scores, and ``cam-engine demo``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import cam_engine as ce
from cam_engine import metrics
from cam_engine.cli import main
from cam_engine.commands.demo_run import MULTI_SEED, SINGLE_SEED, TOLERANCE
from cam_engine.demo import model as shapes_model
from cam_engine.demo import shapes

N = 128


@pytest.fixture(scope="module")
def net():
    return shapes_model.pretrained()


@pytest.fixture(scope="module")
def single():
    return shapes.single(N, 64, SINGLE_SEED)


@pytest.fixture(scope="module")
def multi():
    return shapes.multi(N, 64, MULTI_SEED)


# the data set ------------------------------------------------------------------------------------


def test_shapes_are_deterministic_and_seed_dependent():
    a, b, c = shapes.single(4, 32, seed=3), shapes.single(4, 32, seed=3), shapes.single(4, 32, 4)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_single_split_shapes_and_masks(single):
    assert single.images.shape == (N, 3, 64, 64) and single.images.dtype == torch.float32
    assert single.images.min() >= 0 and single.images.max() <= 1
    assert single.labels.shape == (N, 1) and set(single.labels.unique().tolist()) == {0, 1, 2, 3}
    area = single.masks.float().mean((2, 3))
    assert (area > 0.01).all() and (area < 0.5).all()


def test_multi_split_objects_are_distinct_and_disjoint(multi):
    labels, masks = multi.labels, multi.masks
    assert labels.shape == (N, 3) and masks.shape == (N, 3, 64, 64)
    assert (labels[:, :2] >= 0).all() and {-1, 0, 1, 2, 3} == set(labels.unique().tolist())
    valid = multi.valid
    assert (masks.any((2, 3)) == valid).all()  # an object has pixels, an empty slot none
    for row in labels.tolist():
        kept = [c for c in row if c >= 0]
        assert len(set(kept)) == len(kept)
    assert (masks.sum(1) <= 1).all()  # no pixel belongs to two objects


def test_object_pixels_differ_from_their_surroundings(single):
    """The object is decidable: its mean colour is far from the background's."""
    inside = (single.images * single.masks).sum((2, 3)) / single.masks.sum((2, 3))
    outside = (single.images * ~single.masks).sum((2, 3)) / (~single.masks).sum((2, 3))
    assert ((inside - outside).abs().mean(1) > 0.1).float().mean() > 0.9


# the shipped model -------------------------------------------------------------------------------


def test_shipped_model_classifies_held_out_images(net, single):
    assert shapes_model.accuracy(net, single) >= 0.95


def test_training_is_reproducible():
    a = shapes_model.train(steps=2, batch=4, seed=1, progress=False)
    b = shapes_model.train(steps=2, batch=4, seed=1, progress=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_maps_point_at_the_object(net, single, method):
    heatmaps = ce.CAMEngine(net, "features", method)(single.images, single.labels).heatmaps
    hits = metrics.pointing_game(heatmaps, single.masks, TOLERANCE)
    assert hits.float().mean() >= 0.9


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_each_object_is_found_by_its_own_class(net, multi, method):
    engine = ce.CAMEngine(net, "features", method)
    heatmaps = engine(multi.images, multi.labels.clamp(min=0)).heatmaps
    hits = metrics.pointing_game(heatmaps, multi.masks, TOLERANCE)[multi.valid]
    assert hits.float().mean() >= 0.9


def test_random_maps_score_the_object_area(single):
    """With no tolerance a uniformly random maximum hits with probability = the object's area."""
    gen = torch.Generator().manual_seed(0)
    heatmaps = torch.rand(N, 1, 64, 64, generator=gen)
    hits = metrics.pointing_game(heatmaps, single.masks, tolerance=0).float().mean()
    area = single.masks.float().mean()
    assert abs(hits - area) < 3 * (area * (1 - area) / N) ** 0.5


def test_gradcam_deletion_auc_is_below_a_random_maps(net, single):
    images, labels = single.images[:32], single.labels[:32]
    heatmaps = ce.CAMEngine(net, "features")(images, labels).heatmaps
    random = torch.rand(heatmaps.shape, generator=torch.Generator().manual_seed(0))
    ours = metrics.deletion(net, images, heatmaps, labels, steps=16).auc
    theirs = metrics.deletion(net, images, random, labels, steps=16).auc
    assert ours.mean() < theirs.mean()


# the command -------------------------------------------------------------------------------------


def test_demo_writes_sheets_and_scores(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--methods", "cam,gradcam", "--batch", "2"]) == 0
    printed = capsys.readouterr().out
    assert "pointing" in printed and "images/s" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy"] >= 0.95
    assert set(summary["localisation"]) == {"cam", "gradcam"}
    for name in ("single.png", "multi.png"):
        with Image.open(tmp_path / name) as sheet:
            width, height = sheet.size
        assert width >= 3 * 64 * 3 and height >= 2 * 64 * 3  # columns x rows of 3x tiles


def test_demo_rejects_an_unknown_method(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
