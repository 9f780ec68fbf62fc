"""Recognise a global-average-pool -> linear head, where dScore/dA is known in closed form.

For ``logits = W @ mean_hw(A) + b`` the gradient of class ``c``'s score is ``W[c] / (h*w)`` at
every position, so CAM and Grad-CAM need no backward pass: one einsum of FC rows with ``A``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GapLinear", "find_gap_linear"]


@dataclass
class GapLinear:
    """A head ``features -> global average pool -> [flatten | dropout]* -> linear``.

    Attributes:
        weight: (N, C) rows of the final linear layer.
        avg_pools: ``AvgPool2d`` modules of the head; global only if their kernel covers the map.
        dropouts: dropout modules of the head; the head is affine only while they are inactive.
    """

    weight: Tensor
    avg_pools: list[nn.AvgPool2d] = field(default_factory=list)
    dropouts: list[nn.Module] = field(default_factory=list)

    def applies(self, features: Tensor) -> bool:
        """Whether the closed form is exact for this (B, C, h, w) map in the current mode."""
        size = tuple(features.shape[-2:])
        pools_global = all(
            _pair(p.kernel_size) == size and _pair(p.padding) == (0, 0) for p in self.avg_pools
        )
        return pools_global and not any(d.training and d.p > 0 for d in self.dropouts)

    def gradients(self, classes: Tensor, features: Tensor) -> Tensor:
        """dScore/dA of each class: (B, K, C, h, w), a broadcast view (no memory per position).

        Args:
            classes: (B, K) class ids.
            features: (B, C, h, w) target map (only its shape is used).
        """
        spatial = features.shape[2:]
        rows = self.weight.detach()[classes].to(features.dtype) / spatial.numel()
        return rows[(...,) + (None,) * len(spatial)].expand(*rows.shape, *spatial)


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _arg(node: fx.Node, index: int, key: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target in (getattr, operator.getitem)
    )


def _pool_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'adaptive', 'avg' (runtime check) or None."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == (1, 1):
            return "adaptive"
        if isinstance(module, nn.AvgPool2d):
            return "avg"
        return None
    name = _name(node)
    if name == "adaptive_avg_pool2d" and _pair(_arg(node, 1, "output_size")) == (1, 1):
        return "adaptive"
    if name == "mean" and node.op in ("call_method", "call_function"):
        dims = _arg(node, 1, "dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if sorted(d % 4 for d in dims) == [2, 3]:
            return "adaptive"
    return None


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.Flatten) and module.start_dim == 1
    name = _name(node)
    if name == "flatten":
        return _arg(node, 1, "start_dim", 0) == 1
    if name in ("view", "reshape") and node.op == "call_method":
        shape = node.args[1:]
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        return len(shape) == 2 and shape[1] == -1
    return False


def _dropout(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | bool | None:
    """The dropout module, True for an inactive functional dropout, None if not a dropout."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Identity):
            return True
        return module if isinstance(module, nn.Dropout) else None
    if node.target is F.dropout:
        return True if not _arg(node, 2, "training", True) else None
    return None


def _linear_weight(node: fx.Node, head: fx.GraphModule) -> Tensor | None:
    if node.op == "call_module":
        module = head.get_submodule(node.target)
        return module.weight if isinstance(module, nn.Linear) else None
    if node.target in (F.linear, torch._C._nn.linear) and node.args[1].op == "get_attr":
        return head.get_parameter(node.args[1].target)
    return None


def find_gap_linear(head: fx.GraphModule) -> GapLinear | None:
    """The head's :class:`GapLinear` form, or ``None`` when it is anything else."""
    modules = dict(head.named_modules())
    placeholders = [n for n in head.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    node, seen_pool, result = placeholders[0], False, None
    pools, dropouts = [], []
    while True:
        users = [u for u in node.users if u.op != "output" and not _is_shape_query(u)]
        if len(users) != 1:
            return result if not users else None
        if result is not None:
            return None  # something follows the linear layer
        node = users[0]
        kind = _pool_kind(node, modules)
        if kind and not seen_pool:
            seen_pool = True
            if kind == "avg":
                pools.append(modules[node.target])
        elif seen_pool and _is_flatten(node, modules):
            pass
        elif seen_pool and (dropout := _dropout(node, modules)) is not None:
            if isinstance(dropout, nn.Module):
                dropouts.append(dropout)
        elif seen_pool and (weight := _linear_weight(node, head)) is not None:
            result = GapLinear(weight, pools, dropouts)
        else:
            return None
