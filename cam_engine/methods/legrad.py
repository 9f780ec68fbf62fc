"""LeGrad (Bousselham et al., 2024) for vision transformers, as torchcam 0.5's ``LeGrad``.

For every block ``l`` it uses, LeGrad scores the block's output tokens with the classifier
(``s_l = heads(encoder.ln(mean over tokens))`` for torchvision's ``VisionTransformer``),
differentiates ``s_l`` with respect to the block's post-softmax attention ``P_l`` (B, H, T, T),
keeps the positive part, averages it over heads and queries, drops the prefix (class) keys and
averages the per-key maps over the blocks.

Hook-free: each block is traced with torch.fx and split twice with :func:`cam_engine.graph.split`,
at the attention's query (``ln_1``) and at the attention's output ``a`` (before the residual).
The blocks run under ``torch.no_grad()`` (the model's own attention kernel, ``P`` never stored);
only each block's tail (dropout, residual, MLP) and the projection run with autograd, from ``a``
as a leaf. Since ``a = out_proj(P V)`` is linear in ``P``, ``dS/dP_h = (dS/da W_out)_h V_h^T``
exactly, with ``V = in_proj_v(query)``: one backward per block for all K targets, down to ``a``
only. torchcam instead runs the whole model with autograd on, forces every target attention into
its slow path to return ``P`` (B, H, T, T) with its graph, and backpropagates once per block and
class. The price here: the model, up to the last block, runs once more after the engine's own
forward, which does not keep the block inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gradients import target_gradients
from ..layout import token_grid
from ..rewrites import AttentionBlock, attention_blocks
from ._registry import Context, MethodOptions, register


@dataclass(frozen=True)
class LegradOptions(MethodOptions):
    """``prefix_tokens``: keys dropped before the grid (default 1, the class token);
    ``projection``: tokens (B, T, D) -> logits (B, N) (default: torchvision's ViT head)."""

    prefix_tokens: int = 1
    projection: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        prefix = self.prefix_tokens
        if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
            raise ValueError(f"prefix_tokens must be a non-negative int, got {prefix!r}")
        if self.projection is not None and not callable(self.projection):
            raise ValueError("legrad's projection must be a function tokens (B, T, D) -> (B, N)")


def _projection(ctx: Context) -> Callable[[Tensor], Tensor]:
    """``tokens (B, T, D) -> logits (B, N)``: ``method_options["projection"]``, else torchcam's
    for torchvision's ``VisionTransformer``: ``heads(encoder.ln(tokens.mean(1)))``."""
    if ctx.options.projection is not None:
        return ctx.options.projection
    model = ctx.split.model
    norm = getattr(getattr(model, "encoder", None), "ln", None)
    heads = getattr(model, "heads", None)
    if not isinstance(norm, nn.Module) or not isinstance(heads, nn.Module):
        raise ValueError(
            "legrad scores each block through the classifier: for models other than torchvision's "
            "VisionTransformer pass method_options={'projection': fn}, fn(tokens) -> logits"
        )
    return lambda tokens: heads(norm(tokens.mean(dim=1)))


def _relevance(
    ctx: Context, block: AttentionBlock, tokens: Tensor, project: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """One block: ``mean over heads and queries of relu(dS/dP)`` (B, K, T) and its output tokens.

    Args:
        tokens: (B, T, D) the block's input.
    """
    attention, rows = block.attention, torch.arange(tokens.shape[0], device=tokens.device)
    with torch.no_grad():
        query = block.query(tokens)[0]
        attended, *extras = block.trunk(tokens)
    attended = attended.detach().requires_grad_(True)
    with torch.enable_grad():
        out = block.tail(attended, *extras)
        if out.shape[:2] != tokens.shape[:2]:
            raise ValueError(
                f"legrad needs blocks that keep their tokens: one maps {tuple(tokens.shape)} "
                f"to {tuple(out.shape)}"
            )
        logits = project(out)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or len(logits) != len(out):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"legrad's projection must return logits (B, N), got {shape}")
        grads = target_gradients(ctx.scores(logits, rows), attended)  # (B, K, T, D)
    with torch.no_grad():
        dim, bias = attention.embed_dim, attention.in_proj_bias
        values = F.linear(
            query, attention.in_proj_weight[2 * dim :], None if bias is None else bias[2 * dim :]
        )
        heads = (attention.num_heads, -1)
        d_mixed = (grads @ attention.out_proj.weight).unflatten(-1, heads)  # dS/d(P V)
        d_probs = torch.einsum("bkqhd,bthd->bkhqt", d_mixed, values.unflatten(-1, heads))
        return d_probs.relu().mean(dim=(2, 3)), out.detach()


@register("legrad", options=LegradOptions, two_d_only=True)
def legrad(ctx: Context) -> Tensor:
    """LeGrad over the block holding the target layer and every later block.

    The default target (the last block's ``ln_1``) gives the last block alone; torchcam's example
    (``list(model.encoder.layers)[-4:]``) is ``target_layer="encoder.layers.encoder_layer_8"``
    on ViT-B/16 (blocks must be consecutive, up to the last). Options: ``prefix_tokens`` (keys
    dropped before the grid, default 1: the class token), ``projection`` (tokens (B, T, D) ->
    logits (B, N); default torchvision's ``heads(encoder.ln(mean over tokens))``). Targets score
    each block's projected logits as they would the model's output.

    Returns:
        (B, K, h, w) on the target layer's token grid, non-negative.
    """
    prefix = ctx.options.prefix_tokens
    entry, blocks = attention_blocks(ctx.split.model, ctx.split.target_layer)
    project = _projection(ctx)
    with torch.no_grad():
        tokens = entry(ctx.x)[0]
    total = 0
    for block in blocks:  # each block's input is the previous one's output
        relevance, tokens = _relevance(ctx, block, tokens, project)
        total = total + relevance
    keys = total[..., prefix:] / len(blocks)
    # the grid of the keys left, not the target map's: its layout guesses the prefix
    grid = token_grid(keys.shape[-1], ctx.image_size) if keys.shape[-1] else None
    if grid is None:
        raise ValueError(
            f"{total.shape[-1]} tokens less prefix_tokens={prefix} do not fill a grid of the "
            f"image's aspect ratio {ctx.image_size}"
        )
    return keys.unflatten(-1, grid)
