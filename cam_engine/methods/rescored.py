"""Methods that differentiate something other than the explained score once: ShapleyCAM (a
Hessian-vector product) and Finer-CAM (a contrastive score), as pytorch-grad-cam 1.5.7 defines them.

Both differentiate the head's graph that the engine keeps for them (``needs_head_graph``): the
trunk runs once, and the backward still stops at the target map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers import gradients_to_nchw
from ._registry import Context, get, register, register_weights, spatial_mean

FINER_COMPARISONS = (1, 2, 3)  # pytorch-grad-cam's DEFAULT_COMPARISON_CATEGORIES


@register_weights("shapleycam", uses_gradients=False, needs_context=True, needs_head_graph=True)
def shapleycam(ctx: Context) -> Tensor:
    """ShapleyCAM (Cai et al., 2025): ``w = mean over positions of (g - H A / 2)``, ``g`` = dS/dA,
    ``H A`` the Hessian of the score with respect to ``A`` times ``A``.

    For a head that is piecewise linear in ``A`` (ReLU, pooling, linear) ``H A = 0`` and this is
    Grad-CAM; it differs after GELU / LayerNorm / softmax (transformer heads). One backward with
    ``create_graph`` and one double backward per target, down to ``A`` only.

    Returns:
        weights (B, K, C).
    """
    features, output = ctx.head_graph
    rows = torch.arange(ctx.x.shape[0], device=ctx.x.device)
    with torch.enable_grad():
        scores = ctx.scores(output, rows)
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
    return spatial_mean(
        gradients_to_nchw(torch.stack(terms, 1), ctx.reshape, tuple(ctx.x.shape[2:]))
    )


def finer_scores(logits: Tensor, classes: Tensor, alpha: float, comparisons) -> Tensor:
    """pytorch-grad-cam's ``FinerWeightedTarget`` for every explained class.

    For class ``c`` the comparison classes ``d_j`` are those whose logits rank ``comparisons``
    (default 1, 2, 3) by distance to ``y_c`` (rank 0 being ``c``); the score is
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
    ranks = torch.as_tensor(comparisons, device=logits.device)
    if int(ranks.max()) >= logits.shape[1] or int(ranks.min()) < 1:
        raise ValueError(f"comparison ranks {comparisons} need 1 <= rank < {logits.shape[1]}")
    target = logits.gather(1, classes)  # (B, K)
    distance = (logits.detach()[:, None] - target.detach()[..., None]).abs()  # (B, K, N)
    distance.scatter_(2, classes[..., None], -1.0)  # the target itself is rank 0
    others = distance.argsort(dim=-1, stable=True)[..., ranks]  # (B, K, J)
    probs = logits.softmax(-1)[:, None].expand(-1, classes.shape[1], -1).gather(2, others)
    compared = logits[:, None].expand(-1, classes.shape[1], -1).gather(2, others)
    numerator = (probs * (target[..., None] - alpha * compared)).sum(-1)
    return numerator / (probs.sum(-1) + 1e-9)


def _finer_inputs(ctx: Context) -> tuple[Tensor, Tensor]:
    from ..engine import target_gradients  # the engine imports the methods: import on use

    features, output = ctx.head_graph
    with torch.enable_grad():
        scores = finer_scores(
            output,
            ctx.classes,
            ctx.options.get("alpha", 1.0),
            ctx.options.get("comparisons", FINER_COMPARISONS),
        )
        grads = target_gradients(scores, features)
    return ctx.activations, gradients_to_nchw(grads, ctx.reshape, tuple(ctx.x.shape[2:]))


def _finer_base(ctx: Context):
    base = get(ctx.options.get("base", "gradcam"))
    if base.needs_context or not base.uses_gradients or base.needs_gap_head:
        raise ValueError(
            f"finercam's base must be a gradient method over (A, G), not {base.name!r}"
        )
    return base


def _finer_weighted(ctx: Context) -> Tensor:
    return _finer_base(ctx).weighted(*_finer_inputs(ctx))


@register(
    "finercam",
    uses_gradients=False,
    needs_context=True,
    needs_head_graph=True,
    weighted=_finer_weighted,
)
def finercam(ctx: Context) -> Tensor:
    """Finer-CAM (Zhang et al., 2025): a base method (``ctx.options["base"]``, default
    ``"gradcam"``) on the gradient of :func:`finer_scores` instead of the class score, which
    subtracts the closest-scoring classes to bring out what tells the target apart from them.
    Options: ``alpha`` (default 1), ``comparisons`` (ranks, default (1, 2, 3)), ``base``.

    Returns:
        (B, K, *s).
    """
    return _finer_base(ctx).fn(*_finer_inputs(ctx))
