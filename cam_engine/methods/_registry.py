"""The method registry, the context given to methods that need more than (A, G), and shared helpers.

Two kinds of methods:

- gradient / activation methods: ``fn(A (B, C, *s), G (B, K, C, *s)) -> cams (B, K, *s)``, a few
  tensor lines each (``G`` is ``None`` for methods with ``uses_gradients=False``);
- context methods (``needs_context=True``): ``fn(ctx: Context) -> cams (B, K, *s)``, for methods
  that run the model again (Score-CAM, Ablation-CAM) or need other gradients (FullGrad, guided
  backpropagation).

``weighted`` (same signature as ``fn``) returns the weighted activations (B, K, C, *s) whose first
principal component replaces the channel sum when the engine runs with ``eigen_smooth=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Method",
    "Context",
    "register",
    "register_weights",
    "register_elementwise",
    "available",
    "get",
    "spatial_mean",
    "spatial_sum",
    "weighted_sum",
    "first_component",
]

MethodFn = Callable[..., Tensor]


@dataclass
class Context:
    """What the engine hands to a context method (``needs_context=True``).

    Attributes:
        x: (B, C, H, W) or (B, C, D, H, W) input batch.
        activations: (B, C, *s) target map in channels-first layout.
        gradients: (B, K, C, *s) dScore/dA, or ``None`` when the method uses no gradients.
        classes: (B, K) explained class ids (-1 for score functions without class ids).
        logits: the model output the targets score (B, N) for classifiers.
        scores: ``scores(output, rows) -> (n, K)``: the explained scores of a model output for a
            batch whose row ``i`` comes from image ``rows[i]``.
        model: the user's model (``nn.Module``).
        cam_model: the :class:`cam_engine.CAMModel` split at the target layer.
        head: ``head(maps (n, *F), rows (n,)) -> output``: the split's head (no autograd) on
            (modified) target maps of images ``rows``, in the layer's native layout ``F``;
            ``None`` when the model was split with a forward hook.
        gap: the head's closed form (:class:`cam_engine.heads.GapLinear`) when it applies to
            this map and the targets are class ids, else ``None``.
        native: (B, *F) the target map in the layer's own layout (tokens, channels-last, ...).
        batch_size: how many extra inputs a perturbation method runs through the model at once.
        options: method-specific keyword options from ``CAMEngine(method_options=...)``.
        guided: set by guided methods: (B, K, C, H, W) guided input gradients.
        reshape: the engine's ``reshape`` (see :func:`cam_engine.layers.to_nchw`), for methods
            that compute target maps or gradients of their own.
        head_graph: for methods registered with ``needs_head_graph``: ``(features, output)``
            of :meth:`cam_engine.CAMModel.explain_forward` without the closed form: ``features``
            (B, *F) is a leaf that requires grad and ``output`` depends on it through the head
            only, so the method differentiates scores of its own without another trunk pass.
    """

    x: Tensor
    activations: Tensor
    gradients: Tensor | None
    classes: Tensor
    logits: Tensor
    scores: Callable[[Tensor, Tensor], Tensor]
    model: Any
    cam_model: Any
    head: Callable[[Tensor, Tensor], Any] | None
    gap: Any = None
    native: Tensor | None = None
    batch_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)
    guided: Tensor | None = None
    reshape: Any = None
    head_graph: tuple[Tensor, Any] | None = None

    def predict(self, inputs: Tensor) -> Tensor:
        """The model's output for other inputs (n, C, H, W), without autograd.

        It runs through the split (trunk, then head), so a trunk compiled with
        ``CAMEngine(compile=...)`` serves perturbation methods' forwards too.
        """
        with torch.no_grad():
            return self.cam_model(inputs)[0]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the name users pass (``"gradcam"``).
        fn: ``(A, G) -> cams (B, K, *s)``, or ``(ctx) -> cams`` when ``needs_context``.
        needs_gap_head: defined only for global-average-pool -> linear heads (classic CAM).
        uses_gradients: needs dScore/dA (the engine skips the backward otherwise).
        needs_context: ``fn`` takes a :class:`Context`.
        weighted: like ``fn`` but returns the weighted activations (B, K, C, *s) for
            ``eigen_smooth``; ``None`` when the method has no such form.
        input_maps: the output is at the input's resolution already (no target map involved).
        two_d_only: defined for 2-D images only.
        needs_head_graph: the engine runs the head with autograd and hands the graph over in
            :attr:`Context.head_graph` (methods that differentiate scores of their own).
    """

    name: str
    fn: MethodFn
    needs_gap_head: bool = False
    uses_gradients: bool = True
    needs_context: bool = False
    weighted: MethodFn | None = None
    input_maps: bool = False
    two_d_only: bool = False
    needs_head_graph: bool = False


_METHODS: dict[str, Method] = {}


def register(name: str, **flags: Any) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method function to the registry under ``name`` (flags: see Method)."""

    def add(fn: MethodFn) -> MethodFn:
        _METHODS[name] = Method(name, fn, **flags)
        return fn

    return add


def _activations(args: tuple) -> Tensor:
    return args[0].activations if isinstance(args[0], Context) else args[0]


def register_weights(name: str, **flags: Any) -> Callable[[MethodFn], MethodFn]:
    """Register a channel-weight method: ``weights(*args) -> (B, K, C)``.

    The map is ``ReLU(sum_c w_c A_c)``; with ``eigen_smooth`` the first principal component of
    ``w_c A_c`` replaces the sum (pytorch-grad-cam's ``BaseCAM.get_cam_image``).
    """

    def add(weights: MethodFn) -> MethodFn:
        def fn(*args: Any) -> Tensor:
            return weighted_sum(weights(*args), _activations(args)).relu()

        def weighted(*args: Any) -> Tensor:
            activations = _activations(args)
            w = weights(*args)
            return w[(...,) + (None,) * (activations.ndim - 2)] * activations[:, None]

        fn.__doc__, fn.__name__ = weights.__doc__, weights.__name__
        _METHODS[name] = Method(name, fn, weighted=weighted, **flags)
        return fn

    return add


def register_elementwise(name: str, **flags: Any) -> Callable[[MethodFn], MethodFn]:
    """Register an element-wise method: ``terms(A, G) -> (B, K, C, *s)``, map = ReLU(sum over C)."""

    def add(terms: MethodFn) -> MethodFn:
        def fn(*args: Any) -> Tensor:
            return terms(*args).sum(dim=2).relu()

        fn.__doc__, fn.__name__ = terms.__doc__, terms.__name__
        _METHODS[name] = Method(name, fn, weighted=terms, **flags)
        return fn

    return add


def available() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def get(name: str) -> Method:
    """The method called ``name``; ``ValueError`` listing the available ones otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _METHODS[name]


def spatial_mean(gradients: Tensor) -> Tensor:
    """Mean of (B, K, C, *spatial) over the spatial dims -> (B, K, C).

    A gradient that is constant over space and given as a broadcast view (stride 0) is read at
    one position instead of being summed over all of them.
    """
    spatial = range(3, gradients.ndim)
    if all(gradients.stride(d) == 0 for d in spatial):
        return gradients[(...,) + (0,) * len(spatial)]
    return gradients.mean(dim=tuple(spatial))


def spatial_sum(maps: Tensor, start: int = 2) -> Tensor:
    """Sum over the dims from ``start`` on, kept as size-1 dims (broadcastable back)."""
    return maps.sum(dim=tuple(range(start, maps.ndim)), keepdim=True)


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """Channel-weighted sum of the map: (B, K, C) x (B, C, *spatial) -> (B, K, *spatial)."""
    return torch.einsum("bkc,bc...->bk...", weights, activations)


def first_component(weighted: Tensor) -> Tensor:
    """Projection of every position on the first principal component of the channels.

    pytorch-grad-cam's ``get_2d_projection``, batched: per map, positions are rows and channels
    columns; columns are centred, and the rows are projected on the first right singular vector.
    A singular vector's sign is arbitrary: LAPACK builds (MKL in torch, OpenBLAS in NumPy) and
    devices pick different ones, so pytorch-grad-cam's map can come out negated, and its ReLU then
    keeps the other half of the image. Here the sign is fixed: the projection is positively
    correlated with the channel sum of ``weighted`` (the map the method gives without
    smoothing), so salient regions stay positive on every device.

    Args:
        weighted: (B, K, C, *s); NaNs count as 0.

    Returns:
        (B, K, *s), before any ReLU.
    """
    weighted = torch.where(weighted.isnan(), 0, weighted)
    rows = weighted.flatten(3).transpose(-1, -2)  # (B, K, P, C)
    rows = rows - rows.mean(dim=-2, keepdim=True)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    projection = (rows @ vh[..., 0, :, None])[..., 0]  # (B, K, P)
    agreement = (projection * weighted.sum(2).flatten(2)).sum(-1, keepdim=True)
    projection = torch.where(agreement < 0, -projection, projection)
    return projection.unflatten(-1, weighted.shape[3:])
