"""cam_engine.metrics against hand-computed values, plain per-image loops, pytorch-grad-cam 1.5.7's
``pytorch_grad_cam.metrics`` and torchcam 0.5's ``torchcam.metrics``."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam.metrics import road as gc_road
from pytorch_grad_cam.metrics.cam_mult_image import (
    CamMultImageConfidenceChange,
    DropInConfidence,
    IncreaseInConfidence,
)
from pytorch_grad_cam.metrics.perturbation_confidence import (
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve
from torch import nn
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric
from torchvision.transforms.functional import gaussian_blur

from cam_engine import metrics
from cam_engine.postprocess import normalize, upsample

SIZE = 32


class TinyNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class AsFloat64(nn.Module):
    """Runs the float64 model on float32 inputs (pytorch-grad-cam's imputer makes float32)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.double())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tensors here are tiny: on a busy 2-core machine, intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = TinyNet().double().eval()
    with torch.no_grad():  # larger weights: scores that move when pixels change
        for p in net.parameters():
            p.mul_(3)
    return net


def make_images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    # float32-exact values, so pytorch-grad-cam's float32 paths see the same pixels
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, SIZE, SIZE, generator=g).double()


def make_maps(batch: int = 2, k: int = 1, seed: int = 3, size: int = SIZE) -> torch.Tensor:
    """Smooth random maps in [0, 1], float32-exact, without ties."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch * k, 1, size, size, generator=g, dtype=torch.float64)
    smooth = F.avg_pool2d(noise, 5, 1, 2, count_include_pad=False)
    return normalize(smooth.view(batch, k, size, size)).float().double()


def softmax_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).softmax(dim=1)


# Localisation ------------------------------------------------------------------------------------


def test_boxes_to_masks_hand_case():
    masks = metrics.boxes_to_masks(torch.tensor([[1.0, 2.0, 4.0, 5.0]]), (6, 6))
    expected = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    expected[0, 0, 2:5, 1:4] = True
    assert torch.equal(masks, expected)


def peak_map(y: int, x: int) -> torch.Tensor:
    heat = torch.zeros(1, 1, SIZE, SIZE)
    heat[0, 0, y, x] = 1.0
    return heat


@pytest.mark.parametrize(
    ("box", "hit0", "hit15"),
    [
        ((20, 10, 26, 13), False, True),  # nearest mask pixel (10, 20): 10 px away
        ((26, 10, 30, 13), False, False),  # nearest (10, 26): 16 px away
        ((25, 10, 30, 13), False, True),  # nearest (10, 25): exactly 15 px away
        ((21, 21, 30, 30), False, False),  # nearest (21, 21): 11 * sqrt(2) = 15.6 px away
        ((19, 22, 30, 30), False, True),  # nearest (22, 19): sqrt(12^2 + 9^2) = 15 px away
        ((8, 8, 12, 12), True, True),  # the maximum is inside
    ],
)
def test_pointing_game_hand_cases(box, hit0, hit15):
    heat = peak_map(10, 10)
    masks = metrics.boxes_to_masks(torch.tensor([box], dtype=torch.float64), (SIZE, SIZE))
    assert metrics.pointing_game(heat, masks, tolerance=0).tolist() == [[hit0]]
    assert metrics.pointing_game(heat, masks, tolerance=15).tolist() == [[hit15]]
    # (B, H, W) masks broadcast over the K maps
    assert metrics.pointing_game(heat, masks[:, 0], tolerance=15).tolist() == [[hit15]]


def test_pointing_game_masks_per_map():
    heat = torch.cat([peak_map(3, 3), peak_map(28, 28)], dim=1)  # (1, 2, H, W)
    mask = torch.zeros(1, 2, SIZE, SIZE, dtype=torch.bool)
    mask[0, 0, 3, 3] = True  # map 0's peak, inside its own mask
    mask[0, 1, 3, 3] = True  # map 1's peak is far from its mask
    assert metrics.pointing_game(heat, mask, tolerance=0).tolist() == [[True, False]]
    assert metrics.pointing_game(heat, mask, tolerance=15).tolist() == [[True, False]]
    assert metrics.pointing_game(heat, mask, tolerance=36).tolist() == [[True, True]]


def test_energy_pointing_game_hand_case():
    heat = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    heat[0, 0, 0, 0], heat[0, 0, 0, 1], heat[0, 0, 3, 3] = 1.0, 0.5, 0.5
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 0, :2] = True  # pixels (0, 0) and (0, 1)
    out = metrics.energy_pointing_game(heat, mask)  # image 1: an all-zero map
    assert out.tolist() == [[0.75], [0.0]]
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0]] * 2, dtype=torch.float64)
    assert torch.equal(
        metrics.energy_pointing_game(heat, metrics.boxes_to_masks(boxes, (4, 4))), out
    )


def test_energy_pointing_game_uniform_map_is_area_share():
    heat = torch.ones(1, 1, 8, 8)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :2] = True
    assert metrics.energy_pointing_game(heat, mask).item() == pytest.approx(8 / 64)


# Deletion / insertion ----------------------------------------------------------------------------


def loop_causal(model, images, maps, classes, steps, base, insert):
    """RISE's CausalMetric written plainly: one image, one map, one step at a time."""
    batch, k = maps.shape[:2]
    n = SIZE * SIZE
    scores = torch.empty(batch, k, steps + 1, dtype=torch.float64)
    for b in range(batch):
        for j in range(k):
            order = torch.argsort(maps[b, j].flatten(), descending=True, stable=True)
            for i in range(steps + 1):
                chosen = order[: i * n // steps]
                src, dst = (images[b], base[b]) if insert else (base[b], images[b])
                img = dst.clone().view(3, n)
                img[:, chosen] = src.reshape(3, n)[:, chosen]
                probs = softmax_scores(model, img.view(1, 3, SIZE, SIZE))
                scores[b, j, i] = probs[0, classes[b, j]]
    return scores


def trapezoid_auc(scores: torch.Tensor, steps: int) -> torch.Tensor:
    x = [(i * SIZE * SIZE // steps) / (SIZE * SIZE) for i in range(steps + 1)]
    area = torch.zeros(scores.shape[:2], dtype=torch.float64)
    for i in range(steps):
        area += (x[i + 1] - x[i]) * (scores[..., i] + scores[..., i + 1]) / 2
    return area


@pytest.mark.parametrize(
    ("insert", "baseline", "steps", "levels"),
    [
        (False, "zeros", 8, None),
        (True, "blur", 8, None),
        (False, 0.25, 7, None),  # 7 does not divide H*W: floor(i * H * W / 7) pixels at step i
        (True, "tensor", 5, None),
        (False, "zeros", 6, 3),  # maps with 4 levels: ties, the lower flat index first
    ],
)
def test_deletion_insertion_equal_a_per_image_loop(model, insert, baseline, steps, levels):
    images, maps = make_images(), make_maps(k=2)
    if levels:
        maps = (maps * levels).round() / levels
    classes = torch.tensor([[0, 3], [2, 2]])
    if baseline == "tensor":
        baseline = torch.linspace(0, 1, SIZE, dtype=torch.float64).expand(3, SIZE, SIZE)
    fn = metrics.insertion if insert else metrics.deletion
    curve = fn(model, images, maps, classes, steps=steps, baseline=baseline, batch_size=5)
    if baseline == "blur":
        base = gaussian_blur(images, [11, 11], [5.0, 5.0])
    elif isinstance(baseline, float):
        base = torch.full_like(images, baseline)
    elif isinstance(baseline, torch.Tensor):
        base = baseline.expand_as(images)
    else:
        base = torch.zeros_like(images)
    expected = loop_causal(model, images, maps, classes, steps, base, insert)
    torch.testing.assert_close(curve.scores, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(curve.auc, trapezoid_auc(expected, steps), rtol=0, atol=1e-12)
    assert curve.fractions.tolist() == [
        (i * SIZE * SIZE // steps) / SIZE**2 for i in range(steps + 1)
    ]
    assert torch.equal(curve.classes, classes)


class StubExtractor:
    """A torchcam CAM extractor that returns fixed maps, to feed torchcam's metrics our maps."""

    def __init__(self, model: nn.Module, maps: torch.Tensor) -> None:
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps[:, 0]]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def test_deletion_insertion_equal_torchcam(model):
    images, maps = make_images(3), make_maps(3, size=16)  # torchcam and we upsample them alike
    steps = 16  # divides H*W: torchcam's ceil-sized steps are then ours
    metric = DeletionInsertionMetric(
        StubExtractor(model, maps), lambda x: x.softmax(-1), steps=steps, batch_size=7
    )
    metric.update(images)
    expected = metric.summary()
    delete = metrics.deletion(model, images, maps, steps=steps, baseline="zeros")
    insert = metrics.insertion(model, images, maps, steps=steps, baseline="zeros")
    assert delete.auc.mean().item() == pytest.approx(expected["deletion_auc"], abs=1e-12)
    assert insert.auc.mean().item() == pytest.approx(expected["insertion_auc"], abs=1e-12)


def test_deletion_maps_upsampled_and_batch_size_independent(model):
    images, low = make_images(), make_maps(size=8)
    a = metrics.deletion(model, images, low, steps=4, batch_size=1)
    b = metrics.deletion(model, images, upsample(low, (SIZE, SIZE)), steps=4, batch_size=100)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-14)


def test_model_output_tuple_and_logit_score(model):
    images, maps = make_images(), make_maps()
    curve = metrics.deletion(lambda x: (model(x), None), images, maps, steps=2, score="logit")
    with torch.no_grad():
        logits = model(images)
    classes = logits.argmax(1, keepdim=True)
    assert torch.equal(curve.classes, classes)
    torch.testing.assert_close(curve.scores[..., 0], logits.gather(1, classes))
    torch.testing.assert_close(
        curve.scores[..., -1], model(torch.zeros_like(images)).gather(1, classes)
    )


# Average Drop / Increase in Confidence -----------------------------------------------------------


def test_confidence_change_equals_pytorch_grad_cam(model):
    images, maps = make_images(4), make_maps(4, seed=5)
    classes = torch.tensor([0, 1, 2, 4])
    res = metrics.confidence_change(model, images, maps, classes)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    cams = maps[:, 0].numpy()
    diff = CamMultImageConfidenceChange()(images, cams, targets, model)  # O - Y, float32
    drop = DropInConfidence()(images, cams, targets, model)  # max(0, Y - O), not / Y
    increase = IncreaseInConfidence()(images, cams, targets, model)
    masked_minus = (res.masked_scores - res.scores)[:, 0].numpy()
    np.testing.assert_allclose(masked_minus, diff, rtol=0, atol=1e-6)
    np.testing.assert_allclose((res.drop * res.scores)[:, 0].numpy(), drop, rtol=0, atol=1e-6)
    assert np.array_equal(res.increase[:, 0].numpy(), increase > 0)
    # both outcomes occur, so the comparison can fail
    assert 0 < res.increase.sum() < 4


def test_confidence_change_equals_torchcam(model):
    images, maps = make_images(4), make_maps(4, seed=5)
    metric = ClassificationMetric(StubExtractor(model, maps), lambda x: x.softmax(-1))
    metric.update(images)
    expected = metric.summary()  # divides by Y + 1e-7
    res = metrics.confidence_change(model, images, maps)
    with torch.no_grad():
        y = model(images).softmax(1).max(1).values
        o = model(images * maps).softmax(1).gather(1, res.classes)[:, 0]
    torch.testing.assert_close(res.drop[:, 0], (y - o).clamp(min=0) / y, rtol=1e-13, atol=0)
    assert res.average_drop.item() == pytest.approx(expected["avg_drop"], rel=1e-5)
    assert res.increase_in_confidence.item() == pytest.approx(expected["conf_increase"], abs=1e-12)


# ROAD --------------------------------------------------------------------------------------------


def random_removed(seed: int, share: float, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, SIZE, SIZE, generator=g) < share


@pytest.mark.parametrize("share", [0.2, 0.95])
def test_noisy_linear_impute_solves_the_road_system_exactly(share):
    images, removed = make_images(), random_removed(7, share)
    out = metrics.noisy_linear_impute(images, removed, noise=0)
    for b in range(images.shape[0]):
        keep = (~removed[b]).numpy().astype(np.float64)
        system, rhs = gc_road.NoisyLinearImputer.setup_sparse_system(
            keep, images[b].numpy(), gc_road.neighbors_weights
        )
        solution = torch.from_numpy(spsolve(csc_matrix(system), rhs)).T  # (C, n_removed)
        expected = images[b].clone().view(3, -1)
        expected[:, removed[b].flatten()] = solution
        torch.testing.assert_close(out[b], expected.view_as(out[b]), rtol=0, atol=1e-9)
        # and pytorch-grad-cam's imputer itself (float32 only: it fails on float64 images)
        theirs = gc_road.NoisyLinearImputer(noise=0)(images[b].float(), torch.from_numpy(keep))
        torch.testing.assert_close(out[b].float(), theirs, rtol=0, atol=2e-6)


def test_noisy_linear_impute_same_noise_as_pytorch_grad_cam(monkeypatch):
    images, removed = make_images(1), random_removed(8, 0.5, batch=1)
    noise = 0.3
    out = metrics.noisy_linear_impute(
        images, removed, noise, generator=torch.Generator().manual_seed(11)
    )
    draw = torch.randn(
        images.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64
    )
    drawn = draw[0].view(3, -1)[:, removed[0].flatten()].float()
    monkeypatch.setattr(torch, "randn_like", lambda t: drawn)
    theirs = gc_road.NoisyLinearImputer(noise=noise)(images[0].float(), (~removed[0]).float())
    torch.testing.assert_close(out[0].float(), theirs, rtol=0, atol=2e-6)
    assert torch.equal(out[0][:, ~removed[0]], images[0][:, ~removed[0]])


def road_reference(model, images, maps, classes, kept, lerf):
    remove = RemoveLeastRelevantFirst if lerf else RemoveMostRelevantFirst
    metric = PerturbationConfidenceMetric(remove(kept, gc_road.NoisyLinearImputer(noise=0)))
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    return metric(images.float(), maps[:, 0].numpy(), targets, AsFloat64(model), return_diff=False)


def test_road_equals_pytorch_grad_cam(model, monkeypatch):
    images, maps = make_images(3), make_maps(3, seed=9)
    classes = torch.tensor([1, 0, 3])
    # q = 20 .. 80 % removed: np.percentile's 1 + floor((H*W - 1) q / 100) = round(q H*W / 100)
    pct = [20, 30, 50, 80]
    res = metrics.road(model, images, maps, classes, percentiles=pct, noise=0)
    assert res.morf.shape == res.lerf.shape == (3, 1, 4)
    for j, q in enumerate(pct):
        morf = road_reference(model, images, maps, classes, 100 - q, lerf=False)
        lerf = road_reference(model, images, maps, classes, 100 - q, lerf=True)
        np.testing.assert_allclose(res.morf[:, 0, j].numpy(), morf, rtol=0, atol=2e-6)
        np.testing.assert_allclose(res.lerf[:, 0, j].numpy(), lerf, rtol=0, atol=2e-6)
    # ROADCombined draws noise with torch.randn_like: silence it to compare
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    combined = gc_road.ROADCombined(percentiles=[20, 50, 80])(
        images.float(), maps[:, 0].numpy(), targets, AsFloat64(model)
    )
    res = metrics.road(model, images, maps, classes, percentiles=[20, 50, 80], noise=0)
    np.testing.assert_allclose(res.combined[:, 0].numpy(), combined, rtol=0, atol=2e-6)


def test_road_batched_over_k_and_noise_is_reproducible(model):
    images, maps = make_images(2), make_maps(2, k=2, seed=4)
    classes = torch.tensor([[0, 1], [2, 3]])
    kwargs = dict(percentiles=[40], noise=0.05, batch_size=3)
    a = metrics.road(
        model, images, maps, classes, generator=torch.Generator().manual_seed(0), **kwargs
    )
    b = metrics.road(
        model, images, maps, classes, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)
    quiet = metrics.road(model, images, maps, classes, percentiles=[40], noise=0)
    # each (image, map) pair equals the single-map call on it
    for j in range(2):
        single = metrics.road(
            model, images, maps[:, j : j + 1], classes[:, j], percentiles=[40], noise=0
        )
        torch.testing.assert_close(quiet.morf[:, j], single.morf[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(quiet.lerf[:, j], single.lerf[:, 0], rtol=0, atol=1e-12)
    assert not torch.equal(a.morf, quiet.morf)


# Errors ------------------------------------------------------------------------------------------


def test_localisation_errors():
    heat, mask = torch.rand(1, 1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        metrics.pointing_game(heat[0], mask)
    with pytest.raises(ValueError, match="empty"):
        metrics.pointing_game(heat[:0], mask[:0])
    with pytest.raises(ValueError, match="NaN"):
        metrics.pointing_game(torch.full_like(heat, float("nan")), mask)
    with pytest.raises(ValueError, match="bool"):
        metrics.pointing_game(heat, mask.float())
    with pytest.raises(ValueError, match="do not fit"):
        metrics.pointing_game(heat, torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance"):
        metrics.pointing_game(heat, mask, tolerance=-1)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.energy_pointing_game(heat - 1, mask)
    with pytest.raises(ValueError, match="xyxy"):
        metrics.boxes_to_masks(torch.zeros(2, 3), (8, 8))


def test_faithfulness_errors(model):
    images, maps = make_images(), make_maps()
    with pytest.raises(ValueError, match="empty batch"):
        metrics.deletion(model, images[:0], maps[:0])
    with pytest.raises(ValueError, match="batch size mismatch"):
        metrics.deletion(model, images, maps[:1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.insertion(model, images, maps * float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        metrics.deletion(model, images * float("nan"), maps)
    with pytest.raises(ValueError, match="2 classes"):
        metrics.deletion(model, images, maps, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="steps"):
        metrics.deletion(model, images, maps, steps=0)
    with pytest.raises(ValueError, match="at most"):
        metrics.deletion(model, images, maps, steps=SIZE * SIZE + 1)
    with pytest.raises(ValueError, match="available: 'zeros'"):
        metrics.deletion(model, images, maps, baseline="noise")
    with pytest.raises(ValueError, match="broadcast"):
        metrics.deletion(model, images, maps, baseline=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown score"):
        metrics.deletion(model, images, maps, score="prob")
    with pytest.raises(ValueError, match="batch_size"):
        metrics.confidence_change(model, images, maps, batch_size=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.confidence_change(model, images, maps * 2)
    with pytest.raises(ValueError, match="percentiles"):
        metrics.road(model, images, maps, percentiles=[0, 50])
    with pytest.raises(ValueError, match="percentiles"):
        metrics.road(model, images, maps, percentiles=[])
    with pytest.raises(ValueError, match="every pixel"):
        metrics.road(model, images[:, :, :2, :2], maps, percentiles=[90])
    with pytest.raises(ValueError, match="logits"):
        metrics.deletion(lambda x: x, images, maps)


def test_imputer_errors():
    images = make_images(1)
    with pytest.raises(ValueError, match="all its pixels"):
        metrics.noisy_linear_impute(images, torch.ones(1, SIZE, SIZE, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        metrics.noisy_linear_impute(images, torch.ones(1, SIZE, SIZE))
    with pytest.raises(ValueError, match="does not fit"):
        metrics.noisy_linear_impute(images, torch.ones(2, SIZE, SIZE, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise"):
        metrics.noisy_linear_impute(images, random_removed(0, 0.5, 1), noise=-1)
