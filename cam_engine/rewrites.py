"""Graph rewrites of the user's model for methods that look past the target layer.

Built with :func:`cam_engine.graph.trace` on the whole model (or one block), once per model and
mode (:func:`cam_engine.cache.per_model`); the weights are shared, never copied:

- :func:`bias_graph`: the model returning every Conv2d / BatchNorm2d output with a bias (FullGrad);
- :func:`guided_model`: the model with every ReLU guided (guided backpropagation);
- :func:`attention_blocks`: the model up to a transformer block, and each later block split
  around its self-attention (LeGrad).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import per_model
from .graph import Graph, split, trace

__all__ = [
    "bias_graph",
    "GuidedReLU",
    "guided_model",
    "AttentionBlock",
    "attention_blocks",
    "attention_child",
]

_BIAS_TYPES = (nn.Conv2d, nn.BatchNorm2d)  # exact types, as pytorch-grad-cam selects them
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}


def bias_graph(model: nn.Module) -> tuple[fx.GraphModule, list[nn.Module]]:
    """``model`` traced to return ``(output, (z_1, ..., z_L))``, the outputs of every Conv2d /
    BatchNorm2d with a bias, and those modules.

    Each ``z_i`` is kept apart from its users by a copy, so in-place ops after it (a ReLU with
    ``inplace=True``) do not change it and ``autograd.grad(score, z_i)`` is dScore/dz_i. Built
    once per model and mode (weights are shared, not copied).
    """

    def build() -> tuple[fx.GraphModule, list[nn.Module]]:
        graph, notes = trace(model)
        if graph is None:
            raise ValueError("fullgrad needs a model torch.fx can trace: " + "; ".join(notes))
        gm = graph.module
        modules = dict(gm.named_modules())
        taps, layers = [], []
        for node in list(gm.graph.nodes):
            module = modules.get(node.target) if node.op == "call_module" else None
            if type(module) in _BIAS_TYPES and module.bias is not None:
                with gm.graph.inserting_after(node):
                    copy = gm.graph.call_method("clone", (node,))
                node.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
                taps.append(node)
                layers.append(module)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        output.args = ((output.args[0], tuple(taps)),)
        gm.recompile()
        return gm, layers

    return per_model(model, "bias taps", build)


class GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward ``grad * (input > 0) * (grad > 0)``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (grad > 0)).to(grad.dtype)


def guided_relu(x: Tensor, *args, **kwargs) -> Tensor:
    """:class:`GuidedReLU`; extra arguments (``inplace``) are ignored."""
    return GuidedReLU.apply(x)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def guided_model(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with every ReLU guided; built once per model and mode, weights shared."""

    def build() -> fx.GraphModule:
        graph, notes = trace(model)
        if graph is None:
            raise ValueError("guided methods need a model torch.fx can trace: " + "; ".join(notes))
        gm = graph.module
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            if _is_relu(node, modules):
                with gm.graph.inserting_after(node):
                    guided = gm.graph.call_function(guided_relu, (node.args[0],))
                node.replace_all_uses_with(guided)
                gm.graph.erase_node(node)
        gm.recompile()
        return gm

    return per_model(model, "guided", build)


@dataclass
class AttentionBlock:
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


def attention_child(module: nn.Module) -> nn.MultiheadAttention | None:
    return next((m for m in module.children() if isinstance(m, nn.MultiheadAttention)), None)


def _graph(model: nn.Module) -> Graph:
    graph, notes = trace(model)
    if graph is None:
        raise ValueError("legrad needs a model torch.fx can trace: " + "; ".join(notes))
    return graph


def _block_of(modules: dict[str, nn.Module], name: str) -> str | None:
    """The innermost module that is or holds ``name`` and has an attention child."""
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
    return next((p for p in prefixes if p in modules and attention_child(modules[p])), None)


def _blocks(model: nn.Module, graph: Graph, layer: str) -> list[str]:
    """The names of the block holding the target layer and of every later block.

    ``layer`` is the engine's name for the target, the outermost module computing it (the last
    block's output is named ``encoder.layers``), so every name of its graph node is tried. A
    block is a module with an ``nn.MultiheadAttention`` child; its later siblings in the
    enclosing ``nn.Sequential`` (torchvision's ``encoder.layers``) or ``nn.ModuleList`` must run
    one after the other, each on the previous one's output (read from the graph).
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
    if not isinstance(container, nn.Sequential | nn.ModuleList):
        raise ValueError(
            f"legrad chains the blocks of an nn.Sequential or nn.ModuleList; {parent!r} is not one"
        )
    names = list(dict(container.named_children()))
    later = [f"{parent}.{name}" if parent else name for name in names[names.index(child) :]]
    if any(attention_child(modules[name]) is None for name in later):
        raise ValueError(f"every module of {parent!r} after {block!r} must be an attention block")
    for before, after in pairwise(later):
        if graph.names.get(before) is not _input_of(graph, after):
            raise ValueError(f"legrad needs {after!r} to run on the output of {before!r}")
    return later


def _input_of(graph: Graph, block: str) -> fx.Node:
    """The one node from outside ``block`` that the block's nodes read."""
    inside = {n for name, n in graph.names.items() if name == block or name.startswith(block + ".")}
    entry = {i for n in inside for i in n.all_input_nodes if i not in inside and i.op != "get_attr"}
    if len(entry) != 1:
        raise ValueError(f"cannot find the single input of block {block!r}")
    return entry.pop()


def _entry(graph: Graph, block: str) -> fx.GraphModule:
    """``x -> (tokens, ...)``: the model up to the input of ``block``."""
    return split(graph, _input_of(graph, block)).trunk


def _check_attention(attention: nn.MultiheadAttention, name: str) -> None:
    """torchcam's conditions: batch-first, packed Q/K/V projections, no added keys, no dropout."""
    if not attention.batch_first or attention.in_proj_weight is None:
        raise ValueError(
            f"legrad needs {name}'s attention batch-first with packed Q/K/V weights "
            "(kdim = vdim = embed_dim)"
        )
    if attention.bias_k is not None or attention.add_zero_attn:
        raise ValueError(f"legrad does not support added attention keys in {name}")
    if attention.training and attention.dropout > 0:
        raise ValueError("legrad does not support active attention dropout: call model.eval()")


def _split_block(block: nn.Module, name: str) -> AttentionBlock:
    graph, notes = trace(block)
    if graph is None:
        raise ValueError(f"legrad needs torch.fx to trace block {name!r}: " + "; ".join(notes))
    attention = attention_child(block)
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
    return AttentionBlock(attention, split(graph, call.args[0]).trunk, cut.trunk, cut.head)


def attention_blocks(
    model: nn.Module, target_layer: str
) -> tuple[fx.GraphModule, list[AttentionBlock]]:
    """The model up to the input of the block holding ``target_layer``, and that block and every
    later one split around its self-attention (each built once per model and mode)."""
    graph = per_model(model, "graph", lambda: _graph(model))
    names = _blocks(model, graph, target_layer)
    modules = dict(model.named_modules())
    for name in names:
        _check_attention(attention_child(modules[name]), name)
    blocks = [
        per_model(model, ("block", name), partial(_split_block, modules[name], name))
        for name in names
    ]
    return per_model(model, ("entry", names[0]), partial(_entry, graph, names[0])), blocks
