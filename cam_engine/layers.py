"""Target layers by name (or module): the error for an unknown name (with the closest ones),
whether a map's grid fits the image, and the default choice in a traced graph. Their maps'
layouts are :mod:`cam_engine.layout`'s."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .layout import token_grid

__all__ = ["unknown_layer_error", "layer_name", "map_fits", "default_target"]


def unknown_layer_error(name: str, modules: Sequence[str], nodes: Sequence[str]) -> ValueError:
    """A ``ValueError`` for an unknown target name that lists the closest known names."""
    close = difflib.get_close_matches(str(name), [*modules, *nodes], n=6, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    shown = ", ".join(modules[-8:])
    return ValueError(
        f"unknown target layer {name!r}.{hint} Module names end with: {shown}. "
        "Dotted module names (e.g. 'layer4', 'features.35') and FX node names are accepted."
    )


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d)
#: prefix tokens (class, distillation, registers) a token map may carry, as layout infers them
_MAX_PREFIX = 8


def layer_name(model: nn.Module, layer: str | nn.Module | None) -> str | None:
    """``layer`` as a target name: a module of ``model`` is named by identity (the name
    ``model.named_modules()`` gives it, e.g. ``model.layer4[-1]`` -> ``"layer4.1"``)."""
    if layer is None or isinstance(layer, str):
        return layer
    if not isinstance(layer, nn.Module):
        raise ValueError(
            f"target_layer must be a name or a module of the model, got {type(layer).__name__}"
        )
    if layer is model:
        raise ValueError("target_layer is the model itself; pick one of its layers")
    name = next((n for n, m in model.named_modules() if m is layer), None)
    if name is None:
        raise ValueError(
            f"target_layer is a {type(layer).__name__} that is not a module of this model"
        )
    return name


def map_fits(shape: Sequence[int], image_size: tuple[int, int]) -> bool:
    """Whether a feature map of ``shape`` lays out on a grid of the image's aspect ratio:
    (B, C, h, w) or (B, h, w, C) with h, w > 1, or tokens (B, T, C) whose last T - p (p <= 8
    prefix tokens) make such a grid. Volumes (B, C, d, h, w) always fit."""
    if len(shape) == 5:
        return True
    if len(shape) == 4:
        return any(
            h > 1 and w > 1 and token_grid(h * w, image_size) == (h, w)
            for h, w in (shape[2:4], shape[1:3])
        )
    if len(shape) == 3:
        # (B, C, T) before a 1-D pooling (HF Swin / FocalNet) is no token map: its T lays out
        # with fewer prefix tokens than its C (a class token alone is always a token map)
        tokens, channels = _prefix(shape[1], image_size), _prefix(shape[2], image_size)
        return tokens is not None and (tokens <= 1 or channels is None or tokens <= channels)
    return False


def _prefix(tokens: int, image_size: tuple[int, int]) -> int | None:
    """The fewest prefix tokens (<= 8) leaving a grid of the image's aspect, or ``None``."""
    prefixes = range(min(_MAX_PREFIX + 1, tokens - 3))
    return next((p for p in prefixes if token_grid(tokens - p, image_size) is not None), None)


def _is_adaptive_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _GLOBAL_POOLS)
    name = getattr(node.target, "__name__", str(node.target))
    return "adaptive_avg_pool" in name or "adaptive_max_pool" in name


def _is_attention(kind: object) -> bool:
    name = str(kind).rpartition(".")[2].lower()
    return "attention" in name or "attn" in name


def _inside_attention(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """The nodes computed inside an attention module, its output excepted: their (B, heads, T, d)
    and (B, heads, T, T) values are not feature maps, whatever their shape, while the module's
    output is (MaxViT's last block ends in its ``grid_attention`` layer)."""
    output: dict[str, fx.Node] = {}  # each attention module's last node: its output
    for node in nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if _is_attention(kind):
                output[path] = node
    return {
        node
        for node in nodes
        for path, kind in (node.meta.get("nn_module_stack") or {}).values()
        if _is_attention(kind) and output[path] is not node
    }


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") or node.meta.get("val")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    found, todo = set(), [node]
    while todo:
        for inp in todo.pop().all_input_nodes:
            if inp not in found:
                found.add(inp)
                todo.append(inp)
    return found


def default_target(
    gm: fx.GraphModule, norms: Sequence[tuple[str, fx.Node]], image_size: tuple[int, int]
) -> fx.Node:
    """The feature map users mean, from shape-annotated nodes: the last map the output depends
    on, outside attention, whose grid has the image's aspect ratio (see :func:`map_fits`).

    - CNNs and channels-last models (the last map is (B, C, h, w) or (B, h, w, C)): that map,
      not an adaptive pooling (VGG's 7x7 ``AdaptiveAvgPool2d`` is skipped for ``features``' last
      layer); when it only permutes a norm's output (Swin), the norm (``norm``);
    - token models (the last map is (B, T, C)): the first norm of the last block that holds two
      of them after the last (B, C, h, w) map (ViT's ``norm1`` / ``ln_1``, pytorch-grad-cam's
      recipe); with no such block (LeViT, FocalNet, HF Swin), the last token map: the last
      stage's output.

    Args:
        gm: graph whose nodes carry ``meta["tensor_meta"]`` or ``meta["val"]``.
        norms: (module name, output node) of every normalisation module, in graph order.
        image_size: (H, W) of the example input.
    """
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    used = _ancestors(next(n for n in nodes if n.op == "output"))
    inside_attention = _inside_attention(nodes)
    maps = [
        n
        for n in nodes
        if n in used
        and n.op not in ("placeholder", "get_attr")
        and (shape := _shape(n)) is not None
        and len(shape) in (3, 4)
        and map_fits(shape, image_size)
        and n not in inside_attention
        and not _is_adaptive_pool(n, modules)
    ]
    if not maps:
        raise ValueError(
            "no feature map (B, C, h, w) or token map (B, T, C) with the input's aspect ratio "
            "found to default to; pass target_layer explicitly"
        )
    if len(_shape(maps[-1])) == 4:
        return _named_norm(maps[-1], modules, {n for _, n in norms})
    last_spatial = max((order[n] for n in maps if len(_shape(n)) == 4), default=-1)
    blocks: dict[str, list[fx.Node]] = {}
    for name, node in norms:
        if order[node] > last_spatial and node in maps:
            blocks.setdefault(name.rpartition(".")[0], []).append(node)
    pairs = [nodes_ for nodes_ in blocks.values() if len(nodes_) >= 2]
    return pairs[-1][0] if pairs else maps[-1]


def _named_norm(node: fx.Node, modules: dict[str, nn.Module], norms: set[fx.Node]) -> fx.Node:
    """The LayerNorm a final permute reads (Swin: ``norm`` (B, h, w, C) -> ``permute``).

    Both give the same maps (the engine reshapes channels-last maps); the norm is the layer
    users name (pytorch-grad-cam's Swin recipe).
    """
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    is_permute = type(module).__name__ == "Permute" or node.target in ("permute", torch.permute)
    inputs = node.all_input_nodes
    return inputs[0] if is_permute and len(inputs) == 1 and inputs[0] in norms else node
