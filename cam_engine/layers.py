"""Target layers by name: the error for an unknown name (with the closest ones) and the default
choice in a traced graph. Their maps' layouts are :mod:`cam_engine.layout`'s."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

__all__ = ["unknown_layer_error", "default_target"]


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


def _is_adaptive_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _GLOBAL_POOLS)
    name = getattr(node.target, "__name__", str(node.target))
    return "adaptive_avg_pool" in name or "adaptive_max_pool" in name


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") or node.meta.get("val")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def default_target(gm: fx.GraphModule, layer_norms: Sequence[tuple[str, fx.Node]]) -> fx.Node:
    """The last spatial feature map before global pooling, from shape-annotated nodes.

    - CNNs: the last node with a (B, C, h, w) output, h > 1 and w > 1, that is not an adaptive
      pooling (so VGG's 7x7 ``AdaptiveAvgPool2d`` is skipped for ``features``' last layer);
      when that node only permutes a LayerNorm's output (Swin), the LayerNorm (``norm``);
    - transformers (token maps (B, T, C) after the last spatial map, as in ViT): the first
      LayerNorm of the last block that holds two of them (``ln_1`` / ``norm1``).

    Args:
        gm: graph whose nodes carry ``meta["tensor_meta"]`` (from shape propagation).
        layer_norms: (module name, output node) of every LayerNorm module, in graph order.
    """
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    spatial = [
        n
        for n in nodes
        if n.op not in ("placeholder", "output")
        and (shape := _shape(n)) is not None
        and len(shape) == 4
        and shape[2] > 1
        and shape[3] > 1
        and not _is_adaptive_pool(n, modules)
    ]
    last_spatial = order[spatial[-1]] if spatial else -1
    token_norms = [
        (name, n)
        for name, n in layer_norms
        if order[n] > last_spatial and len(_shape(n) or ()) == 3
    ]
    blocks: dict[str, list[fx.Node]] = {}
    for name, node in token_norms:
        blocks.setdefault(name.rpartition(".")[0], []).append(node)
    pairs = [nodes_ for nodes_ in blocks.values() if len(nodes_) >= 2]
    if pairs:
        return pairs[-1][0]
    if spatial:
        return _named_norm(spatial[-1], modules, {n for _, n in layer_norms})
    raise ValueError(
        "no spatial feature map (B, C, h, w) found to default to; pass target_layer explicitly"
    )


def _named_norm(node: fx.Node, modules: dict[str, nn.Module], norms: set[fx.Node]) -> fx.Node:
    """The LayerNorm a final permute reads (Swin: ``norm`` (B, h, w, C) -> ``permute``).

    Both give the same maps (the engine reshapes channels-last maps); the norm is the layer
    users name (pytorch-grad-cam's Swin recipe).
    """
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    is_permute = type(module).__name__ == "Permute" or node.target in ("permute", torch.permute)
    inputs = node.all_input_nodes
    return inputs[0] if is_permute and len(inputs) == 1 and inputs[0] in norms else node
