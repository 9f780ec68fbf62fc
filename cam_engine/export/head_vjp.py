"""Grad-CAM of any traceable head: ``A -> scores -> dScore/dA`` traced as one graph of ATen ops.

Exporters cannot run autograd, so :func:`trace_head_gradient` records the head's forward and its
backward together with ``make_fx`` (symbolic shapes: no size is baked in) into an FX graph of
plain ATen ops, which the dynamo exporter turns into ONNX. Ops without an ONNX form, or whose
export would fix a size, are decomposed on the way (:mod:`.decompositions`).

:class:`HeadGradCAM` runs the trunk, this graph, the engine's layout of the target map (tokens
and channels-last maps to (B, C, h, w), as :func:`cam_engine.layout.to_nchw` infers it at the
export size) and the shared post-processing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch import Tensor
from torch.fx.experimental import _config as shape_config
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..layout import to_nchw
from ..model import CAMModel, OutputSelector, select_output
from .decompositions import DECOMPOSITIONS
from .graphs import Postprocess, _CAMGraph, _top_classes

__all__ = ["MapLayout", "HeadGradCAM", "trace_head_gradient", "size_branches", "DECOMPOSITIONS"]


@dataclass(frozen=True)
class MapLayout:
    """How the target map becomes (B, C, h, w), read once at the export size.

    Attributes:
        kind: ``"nchw"``, ``"nhwc"`` (Swin's channels-last map) or ``"tokens"`` ((B, T, C), ViT).
        prefix: tokens before the grid (class, distillation, register tokens).
        stride: input pixels per grid row and column at the export size; the grid of another
            input size is ``(H // stride_h, tokens // that)``.
    """

    kind: str
    prefix: int = 0
    stride: tuple[int, int] = (1, 1)

    @classmethod
    def infer(cls, features: Tensor, size: tuple[int, int]) -> MapLayout:
        """The layout :func:`cam_engine.layout.to_nchw` infers for ``features`` of an image of
        ``size`` (H, W) (the engine's default ``reshape=None``)."""
        laid = to_nchw(features, None, size)
        if features.ndim == 3:
            grid = laid.shape[-2:]
            stride = (max(1, size[0] // grid[0]), max(1, size[1] // grid[1]))
            return cls("tokens", features.shape[1] - grid[0] * grid[1], stride)
        return cls("nhwc" if laid.shape != features.shape else "nchw")

    def spatial_dims(self, ndim: int) -> tuple[int, ...]:
        """The dimensions of a map with ``ndim`` dimensions that follow the input's size."""
        if self.kind == "tokens":
            return (1,)
        return (1, 2) if self.kind == "nhwc" else tuple(range(2, ndim))

    def apply(self, maps: Tensor, image: Tensor) -> Tensor:
        """``maps`` (B, *F) in this layout -> (B, C, h, w); ``image`` (B, 3, H, W) sets the grid."""
        if self.kind == "nhwc":
            return maps.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            tokens = maps[:, self.prefix :]
            rows = image.shape[-2] // self.stride[0]
            grid = tokens.reshape(tokens.shape[0], rows, tokens.shape[1] // rows, -1)
            return grid.permute(0, 3, 1, 2)
        return maps


def trace_head_gradient(
    head: Callable[..., object],
    features: Tensor,
    extras: tuple,
    output: OutputSelector,
    topk: int,
    classes_given: bool,
) -> fx.GraphModule:
    """``head``'s logits and the gradient of each explained class's score, as one ATen graph.

    The graph is ``(features, *extras[, classes]) -> (logits (B, N), classes (B, K),
    grads (B, K, *F))`` with ``grads[:, k] = d logits[b, classes[b, k]] / d features``, and
    ``classes`` the top-``topk`` logits unless given. The score is ``(logits * one_hot).sum()``:
    a gather's backward has no ONNX form. Parameters are frozen into the graph.

    Args:
        head: the split's head, ``(features, *extras) -> model output``.
        features: (B, *F) an example target map; traced with symbolic sizes (no two alike, so
            that no size stands for another), so the graph holds at every batch and map size.
        extras: the trunk's other outputs that the head takes: tensors, and sizes (ints) that
            the trunk read from the input's shape (the batch of a Hugging Face ``torch.export``
            split, the grid timm PiT lays its tokens out by); traced as symbols, each an input
            of the graph, so that they follow the input too.
        output: where the logits are in the head's output (:func:`select_output`).
        topk: K when the classes are not given.
        classes_given: the graph takes ``classes`` (B, K) int64 as its last input.

    Raises:
        ValueError: the head could not be traced (the op that failed is named).
    """

    def gradients(features: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        given = rest[-1] if classes_given else None
        extra = rest[:-1] if classes_given else rest
        with torch.enable_grad():
            leaf = features.detach().requires_grad_(True)
            logits = select_output(head(leaf.clone(), *extra), output)
            classes = _top_classes(logits, topk) if given is None else given
            ids = torch.arange(logits.shape[1], device=logits.device)
            one_hot = (classes[..., None] == ids).to(logits.dtype)  # (B, K, N)
            grads = [
                torch.autograd.grad((logits * one_hot[:, k]).sum(), leaf, retain_graph=True)[0]
                for k in range(classes.shape[1])
            ]
        return logits.detach(), classes, torch.stack(grads, 1)

    inputs = (features, *extras)
    if classes_given:
        inputs += (torch.zeros(features.shape[0], topk, dtype=torch.long, device=features.device),)
    try:
        # attention by its math form: the fused kernels' backward ops have no ONNX form
        with shape_config.patch(use_duck_shape=False), sdpa_kernel(SDPBackend.MATH):
            return make_fx(
                gradients, DECOMPOSITIONS, tracing_mode="symbolic", _allow_non_fake_inputs=True
            )(*inputs)
    except Exception as exc:  # an op without a symbolic-shape rule or a decomposition
        raise ValueError(
            f"the head's gradient could not be traced: {type(exc).__name__}: {exc}"
        ) from None


def _widened(values: tuple) -> tuple:
    """``values`` with floating tensors below float32 in float32 (sizes pass as they are)."""
    return tuple(
        t.float() if isinstance(t, Tensor) and t.is_floating_point() and t.itemsize < 4 else t
        for t in values
    )


def size_branches(graph: fx.GraphModule, dims: tuple[int, ...]) -> list[str]:
    """Where :func:`trace_head_gradient`'s ``graph`` took a branch on one size of its first
    input's ``dims`` against a constant (timm's ``ConvMlp``: ``h < 7`` pools the map up to 7x7).

    Tracing follows the branch of the traced size and drops the condition, so the graph holds
    only on that side of it. Returns the conditions, as ``"h >= 7 (map dimension 2)"``.
    """
    placeholder = next(node for node in graph.graph.nodes if node.op == "placeholder")
    shape = placeholder.meta["val"].shape
    symbols = {shape[d].node.expr: d for d in dims if isinstance(shape[d], torch.SymInt)}
    found = []
    for guard in graph.shape_env.guards:
        expr = guard.expr
        if not expr.is_Relational or isinstance(expr, sympy.Ne):  # ``!= 1``: not a branch
            continue
        if any(a.is_Integer for a in expr.args) and len(expr.free_symbols) == 1:
            (symbol,) = expr.free_symbols
            if symbol in symbols and any(a == symbol for a in expr.args):
                found.append(f"{expr} (map dimension {symbols[symbol]})")
    return found


class HeadGradCAM(_CAMGraph):
    """Grad-CAM of a general head: the trunk, then :func:`trace_head_gradient`'s graph.

    The Grad-CAM weights are the spatial mean of dScore/dA laid out as (B, K, C, h, w), as the
    engine computes them; the map is ``relu(sum_c w_c A_c)``.

    Args:
        model: the split model.
        topk: classes explained per image when none are given.
        post: what to do with the raw maps.
        example: (B, C, H, W) images at the export size, to trace the head's gradient with.
        classes_given: the graph takes the classes as an input.
        dynamic_size: the graph must hold at every input size: a head whose code branches on
            the map's size (:func:`size_branches`) raises ``ValueError``.
    """

    def __init__(
        self,
        model: CAMModel,
        topk: int,
        post: Postprocess,
        example: Tensor,
        classes_given: bool,
        dynamic_size: bool,
    ) -> None:
        built = model.current()
        super().__init__(topk, post, next(model.model.parameters()).dtype)
        self.trunk = built.split.trunk
        with torch.no_grad():
            features, *extras = self.trunk(example.to(self.dtype))
        self.layout = MapLayout.infer(features, tuple(example.shape[-2:]))
        # the head runs in float32 at least: the exporter writes some float16 gradient ops
        # with a float32 operand, which ONNX refuses
        head = built.split.head
        if self.dtype.itemsize < 4:
            head = copy.deepcopy(head).float()
        features, *extras = _widened((features, *extras))
        self.gradients = trace_head_gradient(
            head, features, tuple(extras), model.output, topk, classes_given
        )
        branches = size_branches(self.gradients, self.layout.spatial_dims(features.ndim))
        if dynamic_size and branches:
            raise ValueError(
                "the head branches on the map's size ("
                + ", ".join(branches)
                + "), so its traced gradient holds at the export size only: export it with "
                "dynamic_size=False"
            )

    def maps(self, x: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        features, *extras = self.trunk(x)
        given = () if classes is None else (classes,)
        logits, classes, grads = self.gradients(*_widened((features, *extras)), *given)
        acts = self.layout.apply(features, x).float()
        grads = self.layout.apply(grads.flatten(0, 1), x).unflatten(0, grads.shape[:2])
        weights = grads.float().mean((-2, -1))
        cams = torch.einsum("bkc,bchw->bkhw", weights, acts).relu()
        return logits, classes, cams
