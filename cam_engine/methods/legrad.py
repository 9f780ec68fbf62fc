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

import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..graph import Graph, split, trace
from ..model import _state_key
from ._registry import Context, register

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Block:
    """One transformer block split around its self-attention.

    Attributes:
        attention: the block's ``nn.MultiheadAttention``.
        query: ``x -> (query, ...)``: the block up to the attention's input.
        trunk: ``x -> (a, *extras)``: the block up to the attention's output ``a``.
        tail: ``(a, *extras) -> tokens``: the rest of the block.
    """

    attention: nn.MultiheadAttention
    query: fx.GraphModule
    trunk: fx.GraphModule
    tail: fx.GraphModule


def _attention_child(module: nn.Module) -> nn.MultiheadAttention | None:
    return next((m for m in module.children() if isinstance(m, nn.MultiheadAttention)), None)


def _cached(model: nn.Module, key: Any, build: Callable[[], Any]) -> Any:
    """``build()``, once per model, train/eval mode, device and dtype."""
    per_model = _CACHE.setdefault(model, {})
    key = (_state_key(model), key)
    if key not in per_model:
        per_model[key] = build()
    return per_model[key]


def _graph(model: nn.Module) -> Graph:
    graph, notes = trace(model)
    if graph is None:
        raise ValueError("legrad needs a model torch.fx can trace: " + "; ".join(notes))
    return graph


def _block_of(modules: dict[str, nn.Module], name: str) -> str | None:
    """The innermost module that is or holds ``name`` and has an attention child."""
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
    return next((p for p in prefixes if p in modules and _attention_child(modules[p])), None)


def _blocks(model: nn.Module, graph: Graph, layer: str) -> list[str]:
    """The names of the block holding the target layer and of every later block.

    ``layer`` is the engine's name for the target, the outermost module computing it (the last
    block's output is named ``encoder.layers``), so every name of its graph node is tried. A
    block is a module with an ``nn.MultiheadAttention`` child; its siblings in the enclosing
    ``nn.Sequential`` (torchvision's ``encoder.layers``) run one after the other.
    """
    modules = dict(model.named_modules())
    node = graph.names.get(layer)
    aliases = [layer, *(name for name, n in graph.names.items() if n is node)]
    block = next((b for b in (_block_of(modules, a) for a in aliases) if b), None)
    if block is None:
        raise ValueError(
            f"legrad needs a vision transformer: target layer {layer!r} is not in a block with an "
            "nn.MultiheadAttention child (torchvision VisionTransformer's "
            "'encoder.layers.encoder_layer_<i>'); pass one of its blocks or a layer inside one"
        )
    parent, _, child = block.rpartition(".")
    container = modules[parent] if parent else model
    if not isinstance(container, nn.Sequential):
        raise ValueError(f"legrad chains the blocks of an nn.Sequential; {parent!r} is not one")
    names = list(dict(container.named_children()))
    later = [f"{parent}.{name}" if parent else name for name in names[names.index(child) :]]
    if any(_attention_child(modules[name]) is None for name in later):
        raise ValueError(f"every module of {parent!r} after {block!r} must be an attention block")
    return later


def _entry(graph: Graph, block: str) -> fx.GraphModule:
    """``x -> (tokens, ...)``: the model up to the input of ``block``."""
    inside = {n for name, n in graph.names.items() if name.startswith(block + ".")}
    entry = {i for n in inside for i in n.all_input_nodes if i not in inside and i.op != "get_attr"}
    if len(entry) != 1:
        raise ValueError(f"cannot find the single input of block {block!r}")
    return split(graph, entry.pop()).trunk


def _check_attention(attention: nn.MultiheadAttention, name: str) -> None:
    """torchcam's conditions: batch-first, packed Q/K/V projections, no added keys, no dropout."""
    if not attention.batch_first or attention.in_proj_weight is None:
        raise ValueError(f"legrad needs {name}'s attention batch-first with packed Q/K/V weights")
    if attention.bias_k is not None or attention.add_zero_attn:
        raise ValueError(f"legrad does not support added attention keys in {name}")
    if attention.training and attention.dropout > 0:
        raise ValueError("legrad does not support active attention dropout: call model.eval()")


def _split_block(block: nn.Module, name: str) -> _Block:
    graph, notes = trace(block)
    if graph is None:
        raise ValueError(f"legrad needs torch.fx to trace block {name!r}: " + "; ".join(notes))
    attention = _attention_child(block)
    modules = dict(graph.module.named_modules())
    calls = [
        n
        for n in graph.module.graph.nodes
        if n.op == "call_module" and modules.get(str(n.target)) is attention
    ]
    if len(calls) != 1 or len({*calls[0].args[:3]}) != 1:
        raise ValueError(f"legrad needs one self-attention call (query = key = value) in {name!r}")
    (call,) = calls
    output = next((u for u in call.users if u.target is operator.getitem and u.args[1] == 0), None)
    if output is None:
        raise ValueError(f"{name!r} does not use its attention's output")
    cut = split(graph, output)
    return _Block(attention, split(graph, call.args[0]).trunk, cut.trunk, cut.head)


def _parts(ctx: Context) -> tuple[fx.GraphModule, list[_Block]]:
    """The model up to the first block's input, and each block split (cached)."""
    model = ctx.model
    graph = _cached(model, ("graph",), lambda: _graph(model))
    names = _blocks(model, graph, ctx.cam_model.target_layer)
    modules = dict(model.named_modules())
    for name in names:
        _check_attention(_attention_child(modules[name]), name)
    blocks = [
        _cached(model, ("block", name), partial(_split_block, modules[name], name))
        for name in names
    ]
    return _cached(model, ("entry", names[0]), partial(_entry, graph, names[0])), blocks


def _projection(ctx: Context) -> Callable[[Tensor], Tensor]:
    """``tokens (B, T, D) -> logits (B, N)``: ``method_options["projection"]``, else torchcam's
    for torchvision's ``VisionTransformer``: ``heads(encoder.ln(tokens.mean(1)))``."""
    projection = ctx.options.get("projection")
    if projection is not None:
        if not callable(projection):
            raise ValueError("legrad's projection must be a function tokens (B, T, D) -> (B, N)")
        return projection
    norm = getattr(getattr(ctx.model, "encoder", None), "ln", None)
    heads = getattr(ctx.model, "heads", None)
    if not isinstance(norm, nn.Module) or not isinstance(heads, nn.Module):
        raise ValueError(
            "legrad scores each block through the classifier: for models other than torchvision's "
            "VisionTransformer pass method_options={'projection': fn}, fn(tokens) -> logits"
        )
    return lambda tokens: heads(norm(tokens.mean(dim=1)))


def _relevance(
    ctx: Context, block: _Block, tokens: Tensor, project: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """One block: ``mean over heads and queries of relu(dS/dP)`` (B, K, T) and its output tokens.

    Args:
        tokens: (B, T, D) the block's input.
    """
    from ..engine import target_gradients  # the engine imports the methods: import on use

    attention, rows = block.attention, torch.arange(tokens.shape[0], device=tokens.device)
    with torch.no_grad():
        query = block.query(tokens)[0]
        attended, *extras = block.trunk(tokens)
    attended = attended.detach().requires_grad_(True)
    with torch.enable_grad():
        out = block.tail(attended, *extras)
        grads = target_gradients(ctx.scores(project(out), rows), attended)  # (B, K, T, D)
    with torch.no_grad():
        dim, bias = attention.embed_dim, attention.in_proj_bias
        values = F.linear(
            query, attention.in_proj_weight[2 * dim :], None if bias is None else bias[2 * dim :]
        )
        heads = (attention.num_heads, -1)
        d_mixed = (grads @ attention.out_proj.weight).unflatten(-1, heads)  # dS/d(P V)
        d_probs = torch.einsum("bkqhd,bthd->bkhqt", d_mixed, values.unflatten(-1, heads))
        return d_probs.relu().mean(dim=(2, 3)), out.detach()


@register("legrad", uses_gradients=False, needs_context=True, two_d_only=True)
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
    prefix = ctx.options.get("prefix_tokens", 1)
    if not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"prefix_tokens must be a non-negative int, got {prefix!r}")
    entry, blocks = _parts(ctx)
    project = _projection(ctx)
    with torch.no_grad():
        tokens = entry(ctx.x)[0]
    total = 0
    for block in blocks:  # each block's input is the previous one's output
        relevance, tokens = _relevance(ctx, block, tokens, project)
        total = total + relevance
    keys = total[..., prefix:] / len(blocks)
    grid = ctx.activations.shape[2:]
    if keys.shape[-1] != grid.numel():
        raise ValueError(
            f"{total.shape[-1]} tokens less prefix_tokens={prefix} do not fill the target "
            f"layer's {tuple(grid)} grid"
        )
    return keys.unflatten(-1, grid)
