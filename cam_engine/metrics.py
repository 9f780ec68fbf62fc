"""Faithfulness and localisation metrics for saliency maps, batched on the maps' device.

Localisation (does the map point at the object?), from the maps and object masks / boxes alone:

- :func:`pointing_game` (Zhang et al. 2016) and :func:`energy_pointing_game` (Wang et al. 2020);
  :func:`boxes_to_masks` rasterises boxes.

Faithfulness (does the model need what the map points at?), by re-scoring perturbed images:

- :func:`deletion` / :func:`insertion` curves and their AUC (Petsiuk et al. 2018, RISE);
- :func:`confidence_change`: Average Drop and Increase in Confidence (Chattopadhyay et al. 2018,
  Grad-CAM++);
- :func:`road`: ROAD, remove-and-debias, MoRF / LeRF curves with noisy linear imputation (Rong et
  al. 2022); :func:`noisy_linear_impute` is the imputer.

The model is any callable ``model(images) -> logits (B, N)`` (a tuple / dict output is searched for
its first tensor, so a :func:`cam_engine.wrap` model works); put it in ``eval()`` mode first. Scores
are softmax probabilities by default, as in the papers and in torchcam / pytorch-grad-cam's
tutorials. Maps of another size than the images are resized to it (bilinear, half-pixel centres).
Perturbed images are built on the images' device and scored ``batch_size`` at a time: the only
Python loop is over those chunks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from .engine import check_images
from .model import select_output
from .postprocess import upsample
from .targets import Targets, resolve_classes

__all__ = [
    "boxes_to_masks",
    "pointing_game",
    "energy_pointing_game",
    "Curve",
    "deletion",
    "insertion",
    "ConfidenceChange",
    "confidence_change",
    "ROADResult",
    "road",
    "noisy_linear_impute",
]

Model = Callable[[Tensor], object]
Score = Literal["softmax", "logit"] | Callable[[Tensor], Tensor]
Baseline = Literal["zeros", "blur"] | float | Tensor | Callable[[Tensor], Tensor]


# Input checks ------------------------------------------------------------------------------------


def _check_maps(name: str, maps: Tensor) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 4:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"{name} must be a (B, K, H, W) tensor, got {shape}")
    if maps.numel() == 0:
        raise ValueError(f"{name} is empty: {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {maps.dtype}")
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} contains NaN or inf")


def _check_masks(heatmaps: Tensor, masks: Tensor) -> Tensor:
    _check_maps("heatmaps", heatmaps)
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
        raise ValueError("masks must be a bool tensor (use boxes_to_masks for boxes)")
    if masks.ndim == 3:
        masks = masks[:, None]
    try:
        if masks.ndim != 4:
            raise RuntimeError
        return masks.to(heatmaps.device).expand_as(heatmaps)
    except RuntimeError:
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} do not fit heatmaps {tuple(heatmaps.shape)}: "
            "give (B, K, H, W), (B, 1, H, W) or (B, H, W)"
        ) from None


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# Localisation ------------------------------------------------------------------------------------


def boxes_to_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Rasterise boxes into masks.

    A pixel ``(i, j)`` (row, column) is inside box ``(x0, y0, x1, y1)`` when its centre
    ``(j + 0.5, i + 0.5)`` lies in ``[x0, x1] x [y0, y1]``, so integer pixel-edge boxes cover
    exactly columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``.

    Args:
        boxes: (B, K, 4) or (B, 4) boxes ``x0, y0, x1, y1`` in pixels.
        size: ``(H, W)`` of the masks.

    Returns:
        (B, K, H, W) bool masks on ``boxes``' device ((B, 1, H, W) for (B, 4) boxes).
    """
    boxes = torch.as_tensor(boxes)
    if boxes.ndim == 2:
        boxes = boxes[:, None]
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, K, 4) or (B, 4) xyxy, got {tuple(boxes.shape)}")
    height, width = size
    boxes = boxes.to(torch.float64)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float64) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float64) + 0.5
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    in_y = (ys >= y0) & (ys <= y1)  # (B, K, H)
    in_x = (xs >= x0) & (xs <= x1)  # (B, K, W)
    return in_y[..., :, None] & in_x[..., None, :]


def pointing_game(heatmaps: Tensor, masks: Tensor, tolerance: int = 15) -> Tensor:
    """Pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop").

    A map scores a hit when its maximum lies within ``tolerance`` pixels (Euclidean) of a pixel of
    the object mask; the paper uses 15 px. ``tolerance=0``: the maximum must fall inside the mask.
    The maximum is ``argmax`` of the flattened map (the first one on ties). Accuracy is
    ``hits.float().mean()`` over the maps whose mask is not empty.

    Args:
        heatmaps: (B, K, H, W) float maps.
        masks: (B, K, H, W), (B, 1, H, W) or (B, H, W) bool object masks (the union of all the
            instances of the explained class); see :func:`boxes_to_masks` for boxes.
        tolerance: radius in pixels, >= 0.

    Returns:
        (B, K) bool hits.
    """
    masks = _check_masks(heatmaps, masks)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    height, width = heatmaps.shape[-2:]
    flat = heatmaps.flatten(2).argmax(dim=2)  # (B, K)
    py, px = flat // width, flat % width
    ys = torch.arange(height, device=heatmaps.device)
    xs = torch.arange(width, device=heatmaps.device)
    # Distance from the maximum to every pixel: exact disc dilation, no kernel size limit.
    dist2 = (ys[:, None] - py[..., None, None]) ** 2 + (xs - px[..., None, None]) ** 2
    return (masks & (dist2 <= tolerance**2)).flatten(2).any(dim=2)


def energy_pointing_game(heatmaps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game (Wang et al. 2020, "Score-CAM").

    The share of the map's energy (the sum of its values) that falls inside the object:
    ``sum(map * mask) / sum(map)``. A map with no energy (all zeros) scores 0.

    Args:
        heatmaps: (B, K, H, W) non-negative float maps (e.g. ``CAMResult.heatmaps``).
        masks: (B, K, H, W), (B, 1, H, W) or (B, H, W) bool object masks or rasterised boxes.

    Returns:
        (B, K) float in [0, 1], the maps' dtype (float32 for half maps).
    """
    masks = _check_masks(heatmaps, masks)
    if (heatmaps < 0).any():
        raise ValueError("heatmaps must be non-negative for the energy pointing game")
    maps = heatmaps.float() if heatmaps.dtype in (torch.float16, torch.bfloat16) else heatmaps
    total = maps.sum(dim=(2, 3))
    inside = (maps * masks).sum(dim=(2, 3))
    return inside / torch.where(total > 0, total, torch.ones_like(total))


# Scoring perturbed images ------------------------------------------------------------------------


def _class_scores(logits: Tensor, score: Score) -> Tensor:
    if score == "softmax":
        return logits.softmax(dim=1)
    if score == "logit":
        return logits
    if callable(score):
        return score(logits)
    raise ValueError(f"unknown score {score!r}; available: 'softmax', 'logit' or a callable")


def _run_chunks(
    n_jobs: int,
    job: Callable[[Tensor], Tensor],
    *,
    device: torch.device,
    batch_size: int,
    progress: bool | None,
    desc: str,
) -> Tensor:
    """``torch.cat`` of ``job(idx)`` over chunks ``idx`` of ``arange(n_jobs)``, ``batch_size``
    at a time, without autograd: each job makes and scores its images, so only one chunk of
    perturbed images (and of their logits) exists at once."""
    outputs = []
    disable = None if progress is None else not progress
    with torch.no_grad():
        starts = range(0, n_jobs, batch_size)
        for start in tqdm(starts, desc=desc, disable=disable, leave=False, unit="batch"):
            outputs.append(job(torch.arange(start, min(start + batch_size, n_jobs), device=device)))
    return torch.cat(outputs)


def _logits(model: Model, images: Tensor) -> Tensor:
    logits = select_output(model(images))
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits (B, N), got {tuple(logits.shape)}")
    return logits


@dataclass(frozen=True)
class _Setup:
    """Checked inputs of a faithfulness metric and the scores of the unperturbed images."""

    images: Tensor  # (B, C, H, W)
    maps: Tensor  # (B, K, H, W), the images' device and size
    classes: Tensor  # (B, K)
    scores: Tensor  # (B, K)
    score: Score
    batch_size: int
    progress: bool | None

    def run(
        self, model: Model, n_jobs: int, build: Callable[[Tensor], tuple[Tensor, Tensor]], desc: str
    ) -> Tensor:
        """Scores (n_jobs,) of perturbed images. ``build(idx (n,))`` -> (images (n, C, H, W),
        pairs (n,)): ``pairs`` index the explained classes ``classes.flatten()``."""
        if n_jobs == 0:
            return self.scores.new_empty(0)
        classes = self.classes.flatten()

        def job(idx: Tensor) -> Tensor:
            images, pairs = build(idx)
            scores = _class_scores(_logits(model, images), self.score)
            return scores.gather(1, classes[pairs, None])[:, 0]

        return _run_chunks(
            n_jobs,
            job,
            device=self.images.device,
            batch_size=self.batch_size,
            progress=self.progress,
            desc=desc,
        )

    def scores_of(self, model: Model, images: Tensor, desc: str) -> Tensor:
        """(B, K) scores of the explained classes on other images (B, C, H, W), one per image."""

        def job(idx: Tensor) -> Tensor:
            scores = _class_scores(_logits(model, images[idx]), self.score)
            return scores.gather(1, self.classes[idx])

        return _run_chunks(
            images.shape[0],
            job,
            device=images.device,
            batch_size=self.batch_size,
            progress=self.progress,
            desc=desc,
        )


def _setup(
    model: Model,
    images: Tensor,
    heatmaps: Tensor,
    targets: Targets,
    score: Score,
    batch_size: int,
    progress: bool | None,
) -> _Setup:
    check_images(images)
    _check_maps("heatmaps", heatmaps)
    _check_positive_int("batch_size", batch_size)
    if heatmaps.shape[0] != images.shape[0]:
        raise ValueError(
            f"batch size mismatch: {images.shape[0]} images, {heatmaps.shape[0]} heatmap sets"
        )
    images = images.detach()
    maps = upsample(heatmaps.detach().to(images.device), images.shape[-2:])
    logits = _run_chunks(
        images.shape[0],
        lambda idx: _logits(model, images[idx]),
        device=images.device,
        batch_size=batch_size,
        progress=progress,
        desc="scoring images",
    )
    classes = resolve_classes(targets, logits)
    if classes.shape[1] != maps.shape[1]:
        raise ValueError(
            f"{maps.shape[1]} maps per image but {classes.shape[1]} classes: give targets with "
            "the classes the maps explain (e.g. CAMResult.classes)"
        )
    scores = _class_scores(logits, score).gather(1, classes)
    return _Setup(images, maps, classes, scores, score, batch_size, progress)


def _saliency_ranks(maps: Tensor) -> Tensor:
    """(B, K, H*W) rank of each pixel, 0 = most salient (ties: the lower index first)."""
    order = maps.flatten(2).argsort(dim=2, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[2], device=order.device).expand_as(order)
    return ranks.scatter_(2, order, positions)


# Deletion / insertion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve.

    Attributes:
        fractions: (S + 1,) fraction of the pixels deleted / inserted at each point.
        scores: (B, K, S + 1) score of the explained class at each point.
        auc: (B, K) area under the curve, trapezoid rule over ``fractions``.
        classes: (B, K) the explained classes.
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor
    classes: Tensor


def _baseline_images(images: Tensor, baseline: Baseline) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(images)
        if baseline == "blur":  # RISE's insertion substrate: Gaussian, 11 px, sigma 5
            return gaussian_blur(images, kernel_size=[11, 11], sigma=[5.0, 5.0])
        raise ValueError(
            f"unknown baseline {baseline!r}; available: 'zeros', 'blur', a number, a tensor or "
            "a callable"
        )
    if isinstance(baseline, bool):
        raise ValueError("baseline must be 'zeros', 'blur', a number, a tensor or a callable")
    if isinstance(baseline, int | float):
        return torch.full_like(images, float(baseline))
    made = baseline(images) if callable(baseline) else baseline
    if not isinstance(made, Tensor):
        raise ValueError(f"baseline must give a tensor, got {type(made).__name__}")
    try:
        made = torch.broadcast_to(made.to(images), images.shape)
    except RuntimeError:
        raise ValueError(
            f"baseline of shape {tuple(made.shape)} does not broadcast to the images "
            f"{tuple(images.shape)}"
        ) from None
    if not torch.isfinite(made).all():
        raise ValueError("baseline contains NaN or inf")
    return made


def _causal_curve(
    model: Model,
    images: Tensor,
    heatmaps: Tensor,
    targets: Targets,
    *,
    insert: bool,
    steps: int,
    baseline: Baseline,
    score: Score,
    batch_size: int,
    progress: bool | None,
) -> Curve:
    _check_positive_int("steps", steps)
    setup = _setup(model, images, heatmaps, targets, score, batch_size, progress)
    images, maps = setup.images, setup.maps
    batch, k, height, width = maps.shape
    n_pixels = height * width
    if steps > n_pixels:
        raise ValueError(f"steps must be at most H*W = {n_pixels}, got {steps}")
    base = _baseline_images(images, baseline)
    ranks = _saliency_ranks(maps)
    counts = torch.arange(steps + 1, device=images.device) * n_pixels // steps
    # Pixels of rank < count come from `top`, the others from `bottom`.
    top, bottom = (images, base) if insert else (base, images)

    def build(idx: Tensor) -> tuple[Tensor, Tensor]:
        pair, step = idx // (steps - 1), idx % (steps - 1) + 1
        b = pair // k
        chosen = ranks.view(batch * k, n_pixels)[pair] < counts[step, None]
        chosen = chosen.view(-1, 1, height, width)
        return torch.where(chosen, top[b], bottom[b]), pair

    interior = setup.run(
        model, batch * k * (steps - 1), build, "insertion" if insert else "deletion"
    )
    base_scores = setup.scores_of(model, base, "baseline")
    first, last = (base_scores, setup.scores) if insert else (setup.scores, base_scores)
    curve = torch.cat([first[..., None], interior.view(batch, k, steps - 1), last[..., None]], 2)
    fractions = counts.to(curve.dtype) / n_pixels
    return Curve(fractions, curve, torch.trapezoid(curve, fractions, dim=2), setup.classes)


_FAITHFULNESS_ARGS = """Args:
        model: ``model(images) -> logits (B, N)`` (or an output holding them), in eval mode.
        images: (B, C, H, W) float images, as the model takes them (normalised).
        heatmaps: (B, K, h, w) saliency maps, resized to (H, W) when their size differs.
        targets: the classes the maps explain: a (B, K) tensor such as ``CAMResult.classes``, or
            anything :class:`cam_engine.CAMEngine` accepts (``None``: the top-1 class).
        score: ``"softmax"`` (probabilities), ``"logit"``, or a callable logits (n, N) -> (n, N).
        batch_size: perturbed images per model call.
        progress: tqdm progress bar; ``None`` shows it on a terminal only."""


def deletion(
    model: Model,
    images: Tensor,
    heatmaps: Tensor,
    targets: Targets = None,
    *,
    steps: int = 20,
    baseline: Baseline = "zeros",
    score: Score = "softmax",
    batch_size: int = 64,
    progress: bool | None = None,
) -> Curve:
    """Deletion curve (Petsiuk et al. 2018, RISE): pixels replaced by the baseline, most salient
    first; a faithful map makes the score fall fast (low AUC is good).

    Point ``i`` of ``steps + 1`` has the ``floor(i * H * W / steps)`` most salient pixels (all
    channels) replaced by ``baseline``; ties in the map go to the lower flat index first. Point 0
    is the image, point ``steps`` the baseline image.
    {args}
        steps: number of deletion steps, 1 .. H*W.
        baseline: ``"zeros"`` (RISE's deletion substrate), ``"blur"`` (Gaussian, 11 px kernel,
            sigma 5, RISE's insertion substrate), a number, a tensor broadcasting to the images,
            or a callable images -> such a tensor.

    Returns:
        :class:`Curve`: ``scores`` (B, K, steps + 1), ``auc`` (B, K).
    """
    return _causal_curve(
        model,
        images,
        heatmaps,
        targets,
        insert=False,
        steps=steps,
        baseline=baseline,
        score=score,
        batch_size=batch_size,
        progress=progress,
    )


def insertion(
    model: Model,
    images: Tensor,
    heatmaps: Tensor,
    targets: Targets = None,
    *,
    steps: int = 20,
    baseline: Baseline = "blur",
    score: Score = "softmax",
    batch_size: int = 64,
    progress: bool | None = None,
) -> Curve:
    """Insertion curve (Petsiuk et al. 2018, RISE): pixels restored into the baseline, most
    salient first; a faithful map makes the score rise fast (high AUC is good).

    Point ``i`` of ``steps + 1`` is the baseline image with the ``floor(i * H * W / steps)`` most
    salient pixels taken from the image (ties: lower flat index first). Point 0 is the baseline,
    point ``steps`` the image.
    {args}
        steps: number of insertion steps, 1 .. H*W.
        baseline: ``"blur"`` (RISE's insertion substrate: Gaussian, 11 px kernel, sigma 5),
            ``"zeros"``, a number, a tensor broadcasting to the images, or a callable.

    Returns:
        :class:`Curve`: ``scores`` (B, K, steps + 1), ``auc`` (B, K).
    """
    return _causal_curve(
        model,
        images,
        heatmaps,
        targets,
        insert=True,
        steps=steps,
        baseline=baseline,
        score=score,
        batch_size=batch_size,
        progress=progress,
    )


# Average Drop / Increase in Confidence -----------------------------------------------------------


@dataclass(frozen=True)
class ConfidenceChange:
    """Scores of the images and of the images multiplied by their maps.

    Attributes:
        scores: (B, K) score ``Y`` of the explained class on the image.
        masked_scores: (B, K) score ``O`` on ``image * map``.
        drop: (B, K) ``max(0, Y - O) / Y``, the Grad-CAM++ paper's drop.
        increase: (B, K) bool ``O > Y``.
        classes: (B, K) the explained classes.
    """

    scores: Tensor
    masked_scores: Tensor
    drop: Tensor
    increase: Tensor
    classes: Tensor

    @property
    def average_drop(self) -> Tensor:
        """Mean of ``drop`` (a fraction; the paper reports it in %; lower is better)."""
        return self.drop.mean()

    @property
    def increase_in_confidence(self) -> Tensor:
        """Share of the maps with ``O > Y`` (the paper reports it in %; higher is better)."""
        return self.increase.float().mean()


def confidence_change(
    model: Model,
    images: Tensor,
    heatmaps: Tensor,
    targets: Targets = None,
    *,
    score: Score = "softmax",
    batch_size: int = 64,
    progress: bool | None = None,
) -> ConfidenceChange:
    """Average Drop and Increase in Confidence (Chattopadhyay et al. 2018, Grad-CAM++).

    The image is multiplied by its map (``image * map``, all channels; the "explanation map" of
    the paper) and re-scored: ``drop = max(0, Y - O) / Y`` and ``increase = O > Y``, with ``Y``
    the score on the image and ``O`` on the masked image. torchcam's ``ClassificationMetric``
    divides by ``Y + 1e-7``; pytorch-grad-cam's ``DropInConfidence`` returns the absolute
    ``max(0, Y - O)`` (not divided by ``Y``) and ``IncreaseInConfidence`` the same ``O > Y``.
    {args}

    Returns:
        :class:`ConfidenceChange`, (B, K) fields.
    """
    setup = _setup(model, images, heatmaps, targets, score, batch_size, progress)
    if (setup.maps < 0).any() or (setup.maps > 1).any():
        raise ValueError("heatmaps must be in [0, 1] (e.g. CAMResult.heatmaps)")
    images, maps = setup.images, setup.maps
    k = maps.shape[1]

    def build(idx: Tensor) -> tuple[Tensor, Tensor]:
        return images[idx // k] * maps.flatten(0, 1)[idx, None], idx

    masked = setup.run(model, maps.shape[0] * k, build, "confidence").view_as(setup.scores)
    drop = (setup.scores - masked).clamp(min=0) / setup.scores
    return ConfidenceChange(setup.scores, masked, drop, masked > setup.scores, setup.classes)


# ROAD --------------------------------------------------------------------------------------------


def _neighbour_mean_sum(z: Tensor) -> Tensor:
    """Weighted sum of each pixel's in-image 8 neighbours, ROAD's weights (Rong et al. 2022):
    1/6 for the direct ones, 1/12 for the diagonals. (N, C, H, W) -> (N, C, H, W).

    The 3x3 kernel is ``(outer([1, 2, 1], [1, 2, 1]) - 4 * centre) / 12``: two shifted-sum passes
    instead of a depthwise convolution, which is far slower on the CPU (float64 above all).
    """
    p = F.pad(z, (1, 1, 1, 1))
    v = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    return (v[..., :-2] + 2 * v[..., 1:-1] + v[..., 2:] - 4 * z) / 12


def _conjugate_gradients(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x: Tensor,
    diag: Tensor,
    tol: float,
    max_iter: int,
) -> Tensor:
    """Jacobi-preconditioned conjugate gradients for the (N, C) independent SPD systems
    ``apply(x) = rhs`` over (H, W), from ``x``; each stops at relative residual ``tol``."""

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum((2, 3), keepdim=True)

    limit = tol**2 * dot(rhs, rhs)
    r = rhs - apply(x)
    z = r / diag
    p, rz = z, dot(r, z)
    active = dot(r, r) > limit  # (N, C, 1, 1)
    for it in range(max_iter):
        # One host sync every 16 iterations, not one per iteration.
        if it % 16 == 0 and not bool(active.any()):
            return x
        ap = apply(p)
        pap = dot(p, ap)
        alpha = torch.where(active & (pap > 0), rz / pap.where(pap > 0, 1), 0)
        x = x + alpha * p
        r = r - alpha * ap
        # Converged systems stop moving (p = 0): iterating on their vanishing residuals would
        # run into subnormal floats, which are very slow on CPUs.
        active = active & (dot(r, r) > limit)
        z = r / diag
        rz_next = dot(r, z)
        beta = torch.where(rz > 0, rz_next / rz.where(rz > 0, 1), 0)
        p = torch.where(active, z + beta * p, 0)
        rz = rz_next
    if bool(active.any()):
        warnings.warn(
            f"noisy_linear_impute: conjugate gradients did not reach tol={tol} in {max_iter} "
            "iterations; the imputation is approximate (raise max_iter)",
            RuntimeWarning,
            stacklevel=4,
        )
    return x


def _impute(
    images: Tensor,
    removed: Tensor,
    noise: float,
    generator: torch.Generator | None,
    tol: float | None,
    max_iter: int | None,
) -> Tensor:
    """:func:`noisy_linear_impute` on checked inputs: images (N, C, H, W), removed (N, H, W)."""
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    y = images.to(dtype)
    height, width = y.shape[2:]
    u = removed[:, None].to(dtype)  # (N, 1, H, W): 1 where a value is imputed
    known = 1 - u
    # Each imputed pixel is the weighted mean of its in-image neighbours: diag * x - W x = W y on
    # the imputed pixels, the known neighbours on the right. The matrix is symmetric and, with
    # one known pixel at least, positive definite (the 8-neighbour grid is connected).
    diag = _neighbour_mean_sum(torch.ones(1, 1, height, width, dtype=dtype, device=y.device))

    def apply(x: Tensor) -> Tensor:
        return u * (diag * x - _neighbour_mean_sum(x))

    rhs = u * _neighbour_mean_sum(known * y)
    # Start from each channel's mean known value: fewer iterations than from 0.
    x = u * (known * y).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True)
    tol = (1e-10 if dtype == torch.float64 else 1e-6) if tol is None else tol
    max_iter = 4 * (height + width) + 100 if max_iter is None else max_iter
    x = _conjugate_gradients(apply, rhs, x, diag, tol, max_iter)
    if noise > 0:
        draw = torch.randn(y.shape, generator=generator, dtype=dtype, device=y.device)
        x = x + noise * draw
    return torch.where(u.bool(), x, y).to(images.dtype)


def noisy_linear_impute(
    images: Tensor,
    removed: Tensor,
    noise: float = 0.01,
    *,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022), batched on the images' device.

    Every removed pixel becomes the weighted mean of its in-image 8 neighbours (weight 1/6 for
    the direct ones, 1/12 for the diagonals, renormalised at the border), known or imputed, per
    channel: a sparse linear system, solved by conjugate gradients to ``tol`` (relative residual;
    1e-10 in float64, 1e-6 otherwise, i.e. exact to the dtype on small images), then
    ``noise * N(0, 1)`` is added to the imputed values. Equals pytorch-grad-cam's
    ``NoisyLinearImputer`` (which solves the same system with SciPy, one image at a time, in
    float32 output).

    Args:
        images: (N, C, H, W) float images.
        removed: (N, H, W) or (N, 1, H, W) bool, True where a value is imputed; every image must
            keep one pixel at least.
        noise: standard deviation of the Gaussian noise added to the imputed values (0: none).
        generator: random generator for the noise, on the images' device.
        tol: relative residual at which the solver stops.
        max_iter: solver iterations at most (default ``4 * (H + W) + 100``); a warning says when
            it stops before ``tol``.

    Returns:
        (N, C, H, W), the images' dtype: the known pixels unchanged, the removed ones imputed.
    """
    check_images(images)
    if not isinstance(removed, Tensor) or removed.dtype != torch.bool:
        raise ValueError("removed must be a bool tensor (N, H, W), True where imputed")
    if removed.ndim == 4 and removed.shape[1] == 1:
        removed = removed[:, 0]
    if removed.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"removed of shape {tuple(removed.shape)} does not fit images {tuple(images.shape)}: "
            "give (N, H, W) or (N, 1, H, W)"
        )
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    removed = removed.to(images.device)
    if bool(removed.flatten(1).all(dim=1).any()):
        raise ValueError("an image has all its pixels removed: nothing to impute from")
    return _impute(images.detach(), removed, noise, generator, tol, max_iter)


@dataclass(frozen=True)
class ROADResult:
    """ROAD's MoRF and LeRF curves.

    Attributes:
        percentiles: (P,) percentage of the pixels removed at each point.
        scores: (B, K) scores on the unperturbed images.
        morf: (B, K, P) scores with the most relevant pixels removed (low is good).
        lerf: (B, K, P) scores with the least relevant pixels removed (high is good).
        classes: (B, K) the explained classes.
    """

    percentiles: Tensor
    scores: Tensor
    morf: Tensor
    lerf: Tensor
    classes: Tensor

    @property
    def combined(self) -> Tensor:
        """(B, K) ``mean over percentiles of (lerf - morf) / 2``: pytorch-grad-cam's
        ``ROADCombined`` (higher is better)."""
        return (self.lerf - self.morf).mean(dim=2) / 2


def road(
    model: Model,
    images: Tensor,
    heatmaps: Tensor,
    targets: Targets = None,
    *,
    percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    score: Score = "softmax",
    batch_size: int = 64,
    progress: bool | None = None,
) -> ROADResult:
    """ROAD, remove and debias (Rong et al. 2022): MoRF and LeRF curves.

    For each percentage ``q`` the ``round(q / 100 * H * W)`` most (MoRF) or least (LeRF)
    relevant pixels are removed and filled in by :func:`noisy_linear_impute`, and the image is
    re-scored. Ties in the map: the lower flat index counts as more relevant.
    pytorch-grad-cam's ``ROADMostRelevantFirst(p)`` / ``ROADLeastRelevantFirst(p)`` name the
    share *kept*, ``p = 100 - q``, and threshold with ``np.percentile``, which removes
    ``1 + floor((H*W - 1) q / 100)`` pixels (the same count for most ``q``, one more for some).
    {args}
        percentiles: percentages of the pixels removed, each in (0, 100).
        noise: the imputation noise (ROAD's 0.01; 0: deterministic).
        generator: random generator for the noise, on the images' device.

    Returns:
        :class:`ROADResult`: ``morf`` and ``lerf`` (B, K, P).
    """
    pct = torch.as_tensor(percentiles, dtype=torch.float64).flatten()
    if pct.numel() == 0 or not ((pct > 0) & (pct < 100)).all():
        raise ValueError(f"percentiles must be a non-empty list in (0, 100), got {percentiles}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    setup = _setup(model, images, heatmaps, targets, score, batch_size, progress)
    images, maps = setup.images, setup.maps
    batch, k, height, width = maps.shape
    n_pixels, pairs, n_pct = height * width, batch * k, pct.numel()
    counts = (pct * n_pixels / 100).round().long()
    if counts.max() == n_pixels:
        raise ValueError(f"percentiles up to {pct.max():g} remove every pixel of {height}x{width}")
    counts = counts.to(images.device)
    ranks = _saliency_ranks(maps).view(pairs, n_pixels)

    def build(idx: Tensor) -> tuple[Tensor, Tensor]:
        least, point, pair = idx // (n_pct * pairs), idx // pairs % n_pct, idx % pairs
        rank = torch.where(least[:, None] == 1, n_pixels - 1 - ranks[pair], ranks[pair])
        removed = (rank < counts[point, None]).view(-1, height, width)
        imputed = _impute(images[pair // k], removed, noise, generator, None, None)
        return imputed, pair

    curves = setup.run(model, 2 * n_pct * pairs, build, "ROAD").view(2, n_pct, batch, k)
    morf, lerf = curves.permute(0, 2, 3, 1)
    return ROADResult(pct.to(curves), setup.scores, morf, lerf, setup.classes)


for _fn in (deletion, insertion, confidence_change, road):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ = _fn.__doc__.format(args=_FAITHFULNESS_ARGS)
del _fn
