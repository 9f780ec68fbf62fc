"""Methods that differentiate something other than the explained score once: ShapleyCAM (a
Hessian-vector product) and Finer-CAM (a contrastive score), as pytorch-grad-cam 1.5.7 defines them.

Both differentiate the head's graph that the engine keeps for them (``needs_head_graph``): the
trunk runs once, and the backward still stops at the target map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..gradients import target_gradients
from ..layout import gradients_to_nchw
from ._registry import (
    Context,
    Method,
    MethodOptions,
    check_number,
    get,
    register,
    register_weights,
    spatial_mean,
)

FINER_COMPARISONS = (1, 2, 3)  # pytorch-grad-cam's DEFAULT_COMPARISON_CATEGORIES


@dataclass(frozen=True)
class FinerOptions(MethodOptions):
    """Finer-CAM's ``alpha`` (>= 0, default 1), comparison ``comparisons`` (distinct ranks >= 1,
    default (1, 2, 3)) and ``base`` method (a gradient method over (A, G), default Grad-CAM)."""

    alpha: float = 1.0
    comparisons: tuple[int, ...] = FINER_COMPARISONS
    base: str = "gradcam"

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        ranks = self.comparisons
        if isinstance(ranks, int | str) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks
        ):
            raise ValueError(f"comparisons must be a sequence of int ranks >= 1, got {ranks!r}")
        if not ranks or len(set(ranks)) != len(ranks):
            raise ValueError(f"comparisons must be distinct ranks, at least one, got {ranks!r}")
        object.__setattr__(self, "comparisons", tuple(ranks))
        base = get(self.base)
        if not base.needs_gradients or base.needs_gap_head or base.smooth is None:
            raise ValueError(
                f"finercam's base must be a gradient method over (A, G), not {base.name!r}"
            )


@register_weights("shapleycam", needs_head_graph=True, double_backward=True)
def shapleycam(ctx: Context) -> Tensor:
    """ShapleyCAM (Cai et al., 2025): ``w = mean over positions of (g - H A / 2)``, ``g`` = dS/dA,
    ``H A`` the Hessian of the score with respect to ``A`` times ``A``.

    For a head that is piecewise linear in ``A`` (ReLU, pooling, linear) ``H A = 0`` and this is
    Grad-CAM; it differs after GELU / LayerNorm / softmax (transformer heads). One backward with
    ``create_graph`` and one double backward per target, down to ``A`` only.

    Returns:
        weights (B, K, C).
    """
    features, output = ctx.head_graph.features, ctx.head_graph.output
    with torch.enable_grad():
        scores = ctx.scores(output, ctx.rows)
        terms = []
        for k in range(scores.shape[1]):
            (g,) = torch.autograd.grad(scores[:, k].sum(), features, create_graph=True)
            hvp = torch.zeros_like(g)
            if g.requires_grad:  # a head linear in A gives a gradient free of A: H = 0
                (hvp,) = torch.autograd.grad(
                    g,
                    features,
                    grad_outputs=features.detach(),
                    retain_graph=True,
                    materialize_grads=True,
                )
            terms.append((g - 0.5 * hvp).detach())
    return spatial_mean(gradients_to_nchw(torch.stack(terms, 1), ctx.reshape, ctx.image_size))


def finer_scores(logits: Tensor, classes: Tensor, alpha: float, comparisons) -> Tensor:
    """pytorch-grad-cam's ``FinerWeightedTarget`` for every explained class.

    For class ``c`` the comparison classes ``d_j`` are those whose logits rank ``comparisons``
    (default 1, 2, 3) by distance to ``y_c`` (rank 0 being ``c``; ranks past the last class are
    dropped, as both peers clamp them); the score is
    ``sum_j p_j (y_c - alpha y_{d_j}) / (sum_j p_j + 1e-9)`` with ``p = softmax(logits)``
    (differentiated too, as in pytorch-grad-cam).

    Args:
        logits: (B, N).
        classes: (B, K) class ids.

    Returns:
        (B, K) scores.
    """
    if (classes < 0).any():
        raise ValueError("finercam needs class-id targets, not score functions")
    kept = [r for r in comparisons if 1 <= r < logits.shape[1]]
    if not kept:
        raise ValueError(f"comparison ranks {comparisons} need 1 <= rank < {logits.shape[1]}")
    ranks = torch.as_tensor(kept, device=logits.device)
    target = logits.gather(1, classes)  # (B, K)
    distance = (logits.detach()[:, None] - target.detach()[..., None]).abs()  # (B, K, N)
    distance.scatter_(2, classes[..., None], -1.0)  # the target itself is rank 0
    others = distance.argsort(dim=-1, stable=True)[..., ranks]  # (B, K, J)
    probs = logits.softmax(-1)[:, None].expand(-1, classes.shape[1], -1).gather(2, others)
    compared = logits[:, None].expand(-1, classes.shape[1], -1).gather(2, others)
    numerator = (probs * (target[..., None] - alpha * compared)).sum(-1)
    return numerator / (probs.sum(-1) + 1e-9)


def _finer_context(ctx: Context) -> tuple[Method, Context]:
    """The base method and its context: the gradients of :func:`finer_scores` in place of the
    explained scores' (the head's graph is kept for it)."""
    opts, record = ctx.options, ctx.head_graph
    with torch.enable_grad():
        scores = finer_scores(record.output, ctx.classes, opts.alpha, opts.comparisons)
        grads = target_gradients(scores, record.features)
    grads = gradients_to_nchw(grads, ctx.reshape, ctx.image_size)
    base = get(opts.base)
    return base, dataclasses.replace(ctx, gradients=grads, options=base.options())


def _finer_smooth(ctx: Context) -> Tensor:
    base, inner = _finer_context(ctx)
    return base.smooth(inner)


@register("finercam", options=FinerOptions, needs_head_graph=True, smooth=_finer_smooth)
def finercam(ctx: Context) -> Tensor:
    """Finer-CAM (Zhang et al., 2025): a base method on the gradient of :func:`finer_scores`
    instead of the class score, which subtracts the closest-scoring classes to bring out what
    tells the target apart from them. Options: :class:`FinerOptions`.

    Returns:
        (B, K, *s).
    """
    base, inner = _finer_context(ctx)
    return base.run(inner).cams
