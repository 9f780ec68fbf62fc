"""Read a split model's head once, as a chain of ops from the target map to the logits.

:func:`read_head` walks the head's FX graph (the part after the target layer) and describes each
op it recognises (:class:`HeadOp`); two readers interpret the description:

- :func:`find_gap_linear`, for the engine: a global-average-pool -> linear head, where dScore/dA
  is known in closed form. For ``logits = W @ mean_hw(A) + b`` the gradient of class ``c``'s
  score is ``W[c] / (h*w)`` at every position, so CAM and Grad-CAM need no backward pass: one
  einsum of FC rows with ``A``. ``A`` may be channels-last (B, h, w, C): Swin's heads pool it
  with a mean over (h, w) or permute it first;
- :func:`cam_engine.export.find_pool_mlp`, for the export: a pool -> flatten -> MLP head, whose
  backward the exported graph writes out.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops.misc import Permute

__all__ = [
    "GapLinear",
    "find_gap_linear",
    "gap_linear_refusal",
    "gap_linear_message",
    "HeadOp",
    "HeadChain",
    "read_head",
    "pair",
]


@dataclass(frozen=True)
class HeadOp:
    """One op of a head, as :func:`read_head` recognised it.

    Attributes:
        kind: what the op does:

            - ``"pool"``: ``module`` is the pooling (``MaxPool2d``, ``AvgPool2d``,
              ``AdaptiveAvgPool2d``, ``AdaptiveMaxPool2d``, ``AdaptiveAvgPool3d``; a functional
              or ``torch.export`` (aten) ``adaptive_avg_pool2d`` / ``3d`` or a mean over (h, w)
              as an ``AdaptiveAvgPool2d``; a mean over dims (1, 2) of a channels-last map is
              read as a ``"permute"`` to (0, 3, 1, 2) and this pool);
            - ``"permute"``: ``module`` is a torchvision ``Permute`` of the dimensions (a
              ``Permute`` module, ``Tensor.permute`` or ``torch.permute``);
            - ``"conv1x1"``: ``module`` is an ``nn.Conv2d`` / ``nn.Conv3d`` with a kernel of ones,
              stride 1, no padding and one group: a linear map of the channels at every
              position;
            - ``"channel-norm"``: a LayerNorm over the channels of a (B, C, h, w) map
              (``LayerNorm2d``, or ``permute -> layer_norm -> permute``); ``module`` is the
              ``nn.LayerNorm`` of the last dimension with the same parameters;
            - ``"flatten"``: (B, C, h, w) -> (B, C*h*w); ``module`` is ``None``;
            - ``"dropout"``: ``module`` is the ``nn.Dropout`` (active in training mode), or
              ``None`` for an ``nn.Identity`` or an inactive functional dropout;
            - ``"linear"``: ``module`` is the ``nn.Linear`` (for ``F.linear`` on parameters, a new
              one sharing them);
            - ``"layer-norm"``: ``module`` is an ``nn.LayerNorm`` over the last dimension (for
              ``F.layer_norm``, a new one sharing its parameters);
            - ``"activation"``: ``module`` is the ``nn.ReLU``, ``nn.Hardswish``, ``nn.SiLU`` or
              ``nn.GELU`` module (an ``nn.ReLU`` for a functional relu).
        module: the op as a module applying it to the op's input (see ``kind``).
        where: the op in words, for error messages (``"Linear module 'fc'"``).
        flattens: the op's output is (B, D): a flatten, or a mean over (h, w) without keepdim.
    """

    kind: Literal[
        "pool",
        "permute",
        "conv1x1",
        "channel-norm",
        "flatten",
        "dropout",
        "linear",
        "layer-norm",
        "activation",
    ]
    module: nn.Module | None
    where: str
    flattens: bool = False


@dataclass(frozen=True)
class HeadChain:
    """A head read from its input: the ops in order, up to the first one not understood.

    Attributes:
        ops: the recognised ops, in order.
        stop: why reading stopped before the head's output (an op not recognised, a branch, a
            head with several inputs), or ``None`` when every op on the way was recognised.
        side_outputs: nodes whose value is an output of the head besides the chain's last
            value (a model returning ``(logits, features)``).
    """

    ops: tuple[HeadOp, ...]
    stop: str | None = None
    side_outputs: tuple[str, ...] = ()


def read_head(head: fx.GraphModule) -> HeadChain:
    """Read a split model's head as a chain of ops from its input (shape queries aside).

    The one reader of heads: :func:`find_gap_linear` and the export's ``find_pool_mlp``
    interpret what it returns.
    """
    modules = dict(head.named_modules())
    placeholders = [n for n in head.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        stop = (
            f"the head takes {len(placeholders)} inputs (a value crosses the cut at the target "
            "layer); only heads fed by the target map alone are supported"
        )
        return HeadChain((), stop)
    node, ops, side_outputs = placeholders[0], [], []
    while True:
        users = [u for u in node.users if not _is_shape_query(u)]
        following = [u for u in users if u.op != "output"]
        if len(following) > 1:
            stop = f"the head branches after {node.name!r}; only chains are supported"
            return HeadChain(tuple(ops), stop, tuple(side_outputs))
        if not following:
            return HeadChain(tuple(ops), None, tuple(side_outputs))
        if len(following) < len(users):
            side_outputs.append(node.name)
        read = _read_op(following[0], head, modules)
        if read is None:
            stop = f"unsupported op in the head: {_describe(following[0], modules)}"
            return HeadChain(tuple(ops), stop, tuple(side_outputs))
        read_ops, node = read
        ops.extend(read_ops)


@dataclass
class GapLinear:
    """A head ``features -> global average pool -> [flatten | dropout]* -> linear`` of a map of
    any rank (B, C, *s), or with a 1x1 convolution in place of the linear layer, before or after
    the pool: ``W @ mean_s(A)`` either way. Or of a channels-last map (B, h, w, C) pooled by a
    mean over (h, w), or permuted to (B, C, h, w) first (Swin).

    Attributes:
        weight: (N, C) rows of the linear layer (of the 1x1 convolution's kernel).
        avg_pools: ``AvgPool2d`` modules of the head; global only if their kernel covers the map.
        dropouts: dropout modules of the head; the head is affine only while they are inactive.
        channels_last: the map is (B, h, w, C); the gradients are laid out the same way.
    """

    weight: Tensor
    avg_pools: list[nn.AvgPool2d] = field(default_factory=list)
    dropouts: list[nn.Module] = field(default_factory=list)
    channels_last: bool = False

    def applies(self, features: Tensor) -> bool:
        """Whether the closed form is exact for this map (B, C, *s), or (B, h, w, C) when
        :attr:`channels_last`, in the current mode."""
        if self.channels_last and features.ndim != 4:
            return False  # the head's permute / mean dims were read for 4-d maps
        size = tuple(self._spatial(features)[-2:])
        pools_global = all(
            pair(p.kernel_size) == size and pair(p.padding) == (0, 0) for p in self.avg_pools
        )
        return pools_global and not any(d.training and d.p > 0 for d in self.dropouts)

    def gradients(self, classes: Tensor, features: Tensor) -> Tensor:
        """dScore/dA of each class in the map's layout: (B, K, C, *s), or (B, K, h, w, C) when
        :attr:`channels_last`; a broadcast view (no memory per position).

        Args:
            classes: (B, K) class ids.
            features: (B, C, *s) or (B, h, w, C) target map (only its shape is used).
        """
        spatial = self._spatial(features)
        rows = self.weight.detach()[classes].to(features.dtype) / spatial.numel()
        if self.channels_last:
            rows = rows[:, :, None, None]
            return rows.expand(*rows.shape[:2], *spatial, rows.shape[-1])
        return rows[(...,) + (None,) * len(spatial)].expand(*rows.shape, *spatial)

    def _spatial(self, features: Tensor) -> torch.Size:
        return features.shape[1:-1] if self.channels_last else features.shape[2:]


def _global_average(module: nn.Module | None) -> bool:
    """An average pool that may cover the whole map (checked on the map by ``applies``)."""
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d):
        size = module.output_size
        return all(s == 1 for s in (size if isinstance(size, tuple | list) else (size,)))
    return isinstance(module, nn.AvgPool2d)


def find_gap_linear(head: fx.GraphModule) -> GapLinear | None:
    """The head's :class:`GapLinear` form, or ``None`` when it is anything else.

    One global average pool and one linear map of the channels: an ``nn.Linear`` after the pool
    and a flatten, or a 1x1 convolution before or after the pool; flattens (after the pool) and
    dropouts anywhere. A permute from channels-last to channels-first may come first (a mean over
    (h, w) of a channels-last map reads as one).
    """
    found = _gap_linear(read_head(head))
    return found if isinstance(found, GapLinear) else None


def gap_linear_refusal(head: fx.GraphModule) -> str | None:
    """Why :func:`find_gap_linear` finds no :class:`GapLinear` form in the head (the first op
    that breaks it, in words), or ``None`` when it finds one."""
    found = _gap_linear(read_head(head))
    return None if isinstance(found, GapLinear) else found


def gap_linear_message(head: fx.GraphModule | None, target_layer: str, method: str) -> str:
    """The refusal of ``method`` (one that needs a global-average-pool -> linear head) after
    ``target_layer``, naming what breaks the form in ``head`` (``None``: a hook capture, no
    graph to read); the engine and the ONNX export both raise it."""
    reason = None if head is None else gap_linear_refusal(head)
    why = (
        "this model's is not (or dropout is active, or the pooling does not cover the whole map)"
        if reason is None
        else f"this model's is not: {reason}"
    )
    return (
        f"method {method!r} needs a head that is global average pooling -> (flatten / dropout) "
        f"-> linear after {target_layer!r}, and {why}; use method='gradcam'"
    )


def _gap_linear(chain: HeadChain) -> GapLinear | str:
    """The chain's :class:`GapLinear` form, else why not."""
    if chain.stop is not None:
        return chain.stop
    pool, weight, flat, dropouts = None, None, False, []
    channels_last = bool(chain.ops) and chain.ops[0].kind == "permute"
    if channels_last and tuple(d % 4 for d in chain.ops[0].module.dims) != _TO_CHANNELS_FIRST:
        dims = tuple(chain.ops[0].module.dims)
        return f"{chain.ops[0].where} permutes to {dims}, not channels-last to channels-first"
    for op in chain.ops[1:] if channels_last else chain.ops:
        if op.kind == "pool" and pool is None and not flat and _global_average(op.module):
            pool, flat = op.module, op.flattens
        elif op.kind == "conv1x1" and weight is None and not flat:
            weight = op.module.weight.flatten(1)
        elif op.kind == "linear" and weight is None and flat:
            weight = op.module.weight
        elif op.kind == "flatten" and pool is not None:
            flat = True
        elif op.kind == "dropout":
            dropouts += [op.module] if op.module is not None else []
        else:
            return f"{op.where} ({op.kind}) where the form allows none"
    if pool is None or weight is None:
        return f"the head has no {'global average pool' if pool is None else 'linear layer'}"
    avg_pools = [pool] if isinstance(pool, nn.AvgPool2d) else []
    return GapLinear(weight, avg_pools, dropouts, channels_last)


# One op ------------------------------------------------------------------------------------------


def _read_op(
    node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]
) -> tuple[tuple[HeadOp, ...], fx.Node] | None:
    """The ops starting at ``node`` and the last node read (a traced channel norm spans three
    nodes; a channels-last mean is two ops)."""
    if (channel_norm := _channel_norm(node, head, modules)) is not None:
        op, end = channel_norm
        return (op,), end
    if (ops := _channels_last_mean(node, modules)) is not None:
        return ops, node
    for read in (
        _pool, _permute, _conv1x1, _flatten, _dropout, _linear, _layer_norm, _activation
    ):  # fmt: skip
        if (op := read(node, head, modules)) is not None:
            return (op,), node
    return None


def pair(value: int | None | tuple | list) -> tuple:
    """A 2-d size argument of torch.nn (``kernel_size``, ``padding``, ``output_size``) per
    dimension: a tuple or list as it is, a single value repeated for (h, w)."""
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


_TO_CHANNELS_FIRST = (0, 3, 1, 2)


def _name(node: fx.Node) -> str:
    """The op's name: a method's, a function's, or an aten op's without its overload
    (``torch.export`` graphs call ``aten.mean.dim``)."""
    if isinstance(node.target, str):
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__
    return getattr(node.target, "__name__", "")


def _arg(node: fx.Node, index: int, key: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target in (getattr, operator.getitem)
    )


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module {node.target!r}"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target!r} (node {node.name!r})"


def _parameter(head: fx.GraphModule, node) -> nn.Parameter | None:
    """The parameter a ``get_attr`` node reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        return head.get_parameter(node.target)
    except AttributeError:  # a buffer or a plain attribute
        return None


_POOLS = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool3d,
)


def _pool(node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]) -> HeadOp | None:
    where = _describe(node, modules)
    if node.op == "call_module":
        module = modules[node.target]
        return HeadOp("pool", module, where) if isinstance(module, _POOLS) else None
    name = _name(node)
    pools = {
        "adaptive_avg_pool2d": nn.AdaptiveAvgPool2d,
        "adaptive_avg_pool3d": nn.AdaptiveAvgPool3d,
    }
    if name in pools:
        size = _arg(node, 1, "output_size")
        sizes = size if isinstance(size, tuple | list) else (size,)
        if all(s is None or isinstance(s, int) for s in sizes):
            return HeadOp("pool", pools[name](size), where)
    if (dims := _mean_dims(node)) is not None:
        if all(isinstance(d, int) for d in dims) and sorted(d % 4 for d in dims) == [2, 3]:
            keep = bool(_arg(node, 2, "keepdim", False))
            return HeadOp("pool", nn.AdaptiveAvgPool2d(1), where, flattens=not keep)
    return None


def _mean_dims(node: fx.Node) -> tuple | None:
    """The dims a ``mean`` node averages over (a method, ``torch.mean`` or aten), else None."""
    if _name(node) != "mean" or node.op not in ("call_method", "call_function"):
        return None
    dims = _arg(node, 1, "dim")
    return (dims,) if isinstance(dims, int) else tuple(dims or ())


def _channels_last_mean(
    node: fx.Node, modules: dict[str, nn.Module]
) -> tuple[HeadOp, HeadOp] | None:
    """A mean over dims (1, 2) of a (B, h, w, C) map to (B, C) (timm's pooling of NHWC maps),
    as a permute to channels-first and a flattening global average pool; else None."""
    if _mean_dims(node) != (1, 2) or _arg(node, 2, "keepdim", False):
        return None
    where = _describe(node, modules)
    permute = HeadOp("permute", Permute(list(_TO_CHANNELS_FIRST)), where)
    return permute, HeadOp("pool", nn.AdaptiveAvgPool2d(1), where, flattens=True)


def _permute(node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]) -> HeadOp | None:
    where = _describe(node, modules)
    if node.op == "call_module":
        module = modules[node.target]
        return HeadOp("permute", module, where) if isinstance(module, Permute) else None
    dims = _permute_dims(node)
    return None if dims is None else HeadOp("permute", Permute(list(dims)), where)


def _conv1x1(node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]) -> HeadOp | None:
    if node.op != "call_module" or not isinstance(
        conv := modules[node.target], nn.Conv2d | nn.Conv3d
    ):
        return None
    ones = all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
    # "same" and "valid" pad nothing with a 1x1 kernel
    unpadded = isinstance(conv.padding, str) or all(p == 0 for p in conv.padding)
    if ones and unpadded and conv.groups == 1:
        return HeadOp("conv1x1", conv, _describe(node, modules))
    return None


def _flatten(node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]) -> HeadOp | None:
    op = HeadOp("flatten", None, _describe(node, modules), flattens=True)
    if node.op == "call_module":
        module = modules[node.target]
        return op if isinstance(module, nn.Flatten) and module.start_dim == 1 else None
    name = _name(node)
    if name == "flatten":
        return op if _arg(node, 1, "start_dim", 0) == 1 else None
    if name in ("view", "reshape"):
        shape = node.args[1:]
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        return op if len(shape) == 2 and shape[1] == -1 else None
    return None


def _dropout(node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]) -> HeadOp | None:
    where = _describe(node, modules)
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Identity):
            return HeadOp("dropout", None, where)
        return HeadOp("dropout", module, where) if isinstance(module, nn.Dropout) else None
    # aten.dropout(input, p, train): the same positions as F.dropout's
    functional = (F.dropout, torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)
    if node.target in functional and not _arg(node, 2, "training", True):
        return HeadOp("dropout", None, where)
    return None


def _linear(node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]) -> HeadOp | None:
    where = _describe(node, modules)
    if node.op == "call_module":
        module = modules[node.target]
        return HeadOp("linear", module, where) if isinstance(module, nn.Linear) else None
    linears = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)
    if node.op != "call_function" or node.target not in linears:
        return None
    weight = _parameter(head, _arg(node, 1, "weight"))
    bias_node = _arg(node, 2, "bias")
    bias = None if bias_node is None else _parameter(head, bias_node)
    if weight is None or (bias_node is not None and bias is None):
        return None
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight, linear.bias = weight, bias
    return HeadOp("linear", linear, where)


def _flat_layer_norm(shape, weight: Tensor | None, bias: Tensor | None, eps: float) -> nn.LayerNorm:
    """A plain ``nn.LayerNorm`` sharing the given parameters (either may be absent)."""
    norm = nn.LayerNorm(shape, eps, elementwise_affine=False)
    norm.weight, norm.bias = weight, bias
    return norm


def _layer_norm(
    node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]
) -> HeadOp | None:
    """The LayerNorm over the last dimension a node applies (module or functional), else None."""
    where = _describe(node, modules)
    if node.op == "call_module":
        module = modules[node.target]
        # the exact type: subclasses (LayerNorm2d) normalise other dimensions in their forward
        plain = type(module) is nn.LayerNorm and len(module.normalized_shape) == 1
        return HeadOp("layer-norm", module, where) if plain else None
    if node.op != "call_function" or node.target is not F.layer_norm:
        return None
    shape, eps = _arg(node, 1, "normalized_shape"), _arg(node, 4, "eps", 1e-5)
    affine = [_arg(node, 2, "weight"), _arg(node, 3, "bias")]
    weight, bias = (a if a is None else _parameter(head, a) for a in affine)
    over_last = isinstance(shape, tuple | list) and len(shape) == 1
    if not over_last or (affine[0] is not None and weight is None):
        return None
    if affine[1] is not None and bias is None:
        return None
    return HeadOp("layer-norm", _flat_layer_norm(shape, weight, bias, eps), where)


def _activation(
    node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]
) -> HeadOp | None:
    where = _describe(node, modules)
    if node.op == "call_module":
        module = modules[node.target]
        known = isinstance(module, nn.ReLU | nn.Hardswish | nn.SiLU | nn.GELU)
        return HeadOp("activation", module, where) if known else None
    if node.target in (F.relu, torch.relu, torch.relu_, "relu", "relu_"):
        return HeadOp("activation", nn.ReLU(), where)
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if not _is_shape_query(u)]
    return users[0] if len(users) == 1 else None


def _permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The order a permute node (method, ``torch.permute`` or aten) puts a 4-d tensor's
    dimensions in, else None."""
    if _name(node) != "permute" or node.op not in ("call_method", "call_function"):
        return None
    order = node.kwargs.get("dims", node.args[1:])
    order = order[0] if len(order) == 1 and isinstance(order[0], tuple | list) else order
    return tuple(d % 4 for d in order) if all(isinstance(d, int) for d in order) else None


def _permutes(node: fx.Node | None, dims: tuple[int, ...]) -> bool:
    """Whether ``node`` permutes the dimensions of a 4-d tensor into the order ``dims``."""
    return node is not None and _permute_dims(node) == dims


def _channel_norm(
    node: fx.Node, head: fx.GraphModule, modules: dict[str, nn.Module]
) -> tuple[HeadOp, fx.Node] | None:
    """The LayerNorm over the channels of a (B, C, h, w) map starting at ``node`` and its last
    node: a ``LayerNorm2d`` module kept as a leaf, or its traced ``permute(0, 2, 3, 1) ->
    layer_norm -> permute(0, 3, 1, 2)``. None if neither."""
    where = _describe(node, modules)
    if node.op == "call_module":
        module = modules[node.target]
        if not isinstance(module, LayerNorm2d):
            return None
        norm = _flat_layer_norm(module.normalized_shape, module.weight, module.bias, module.eps)
        return HeadOp("channel-norm", norm, where), node
    if not _permutes(node, (0, 2, 3, 1)) or (inner := _only_user(node)) is None:
        return None
    norm = _layer_norm(inner, head, modules)
    if norm is None or not _permutes(end := _only_user(inner), (0, 3, 1, 2)):
        return None
    return HeadOp("channel-norm", norm.module, where), end
