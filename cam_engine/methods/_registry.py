"""The method registry, the one input type of every method, typed options and shared helpers.

Every registered method is called the same way, ``Method.run(ctx: Context) -> MethodOutput``, and
is a pure function of its context: it reads tensors and asks the split model for more through
:class:`SplitAccess`; it never builds an engine or a model. Most methods are written over the two
tensors alone and registered with ``over_maps=True``:

- channel-weight methods ``weights(A (B, C, *s), G (B, K, C, *s)) -> (B, K, C)``
  (:func:`register_weights`): the map is ``ReLU(sum_c w_c A_c)``;
- element-wise methods ``terms(A, G) -> (B, K, C, *s)`` (:func:`register_elementwise`): the map
  is ``ReLU(sum over C)``;
- map methods ``fn(A, G) -> (B, K, *s)`` (:func:`register`).

Methods that need more (the model run on other inputs, other gradients) take the
:class:`Context` itself. ``smooth`` returns the weighted activations (B, K, C, *s) whose first
principal component replaces the channel sum when the engine runs with ``eigen_smooth=True``.
Method options are a frozen dataclass per method (:class:`MethodOptions`), checked when the
engine is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..gradients import ForwardRecord
from ..targets import Resolved

if TYPE_CHECKING:
    from ..heads import GapLinear
    from ..layout import Reshape

__all__ = [
    "Method",
    "MethodOutput",
    "MethodOptions",
    "check_number",
    "check_count",
    "Context",
    "SplitAccess",
    "register",
    "register_weights",
    "register_elementwise",
    "register_composition",
    "available",
    "get",
    "spatial_mean",
    "spatial_sum",
    "weighted_sum",
    "first_component",
]

Scorer = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class MethodOptions:
    """Options of a method without any; subclasses add typed fields with defaults.

    ``CAMEngine(method_options={...})`` is turned into the method's options class by
    :meth:`parse`, which rejects unknown keys; each subclass checks its values in
    ``__post_init__``.
    """

    @classmethod
    def parse(cls, method: str, given: Mapping[str, Any] | MethodOptions | None) -> MethodOptions:
        """``cls(**given)``; ``ValueError`` naming the valid keys for unknown ones."""
        if isinstance(given, cls):
            return given
        if given is None:
            return cls()
        if not isinstance(given, Mapping):
            raise ValueError(f"method_options must be a dict, got {type(given).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            known = ", ".join(valid) if valid else "none"
            raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid: {known}")
        return cls(**given)


def check_number(name: str, value: object, *, positive: bool = False) -> None:
    """``ValueError`` unless ``value`` is a finite real number (and > 0 with ``positive``)."""
    real = isinstance(value, int | float) and not isinstance(value, bool)
    if not real or value != value or abs(value) == float("inf") or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_count(name: str, value: object, *, minimum: int = 1) -> None:
    """``ValueError`` unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class MethodOutput:
    """What a method returns.

    Attributes:
        cams: (B, K, *s) maps after the method's ReLU, or (B, 1, *s) for class-agnostic maps
            (the engine broadcasts them to K).
        guided: (B, K, C, H, W) guided input gradients (guided methods only).
    """

    cams: Tensor
    guided: Tensor | None = None


class SplitAccess(Protocol):
    """What a method may ask of the model split at the target layer, for one batch."""

    model: nn.Module
    target_layer: str

    def predict(self, inputs: Tensor) -> Tensor:
        """The selected model output for other inputs (n, C, H, W), without autograd."""

    def head(self, maps: Tensor, rows: Tensor) -> Tensor:
        """The head's output (no autograd) on target maps (n, *F) of images ``rows`` (n,)."""

    def record(self, inputs: Tensor, *, closed_form: bool) -> ForwardRecord:
        """A forward of other inputs: trunk without autograd, head with (or closed form)."""

    def select(self, output: Any) -> Tensor:
        """The explained tensor of a full model output (the engine's ``output=`` selector)."""


@dataclass(frozen=True)
class Context:
    """The input of every method.

    Attributes:
        x: (B, C, H, W) or (B, C, D, H, W) input batch.
        activations: (B, C, *s) target map in channels-first layout.
        gradients: (B, K, C, *s) dScore/dA for methods registered with ``needs_gradients``,
            else ``None``.
        targets: the explained targets bound to this batch (:attr:`classes`, :attr:`scores`).
        logits: the model output the targets score ((B, N) for classifiers).
        native: (B, *F) the target map in the layer's own layout (tokens, channels-last, ...).
        options: the method's typed options.
        batch_size: how many extra inputs a perturbation method runs through the model at once.
        reshape: the engine's ``reshape`` (see :func:`cam_engine.layout.to_nchw`), for methods
            that compute target maps or gradients of their own.
        split: the split model, to run it on other inputs.
        closed_form: the head's closed form when the engine uses it for this call, else ``None``.
        head_graph: for methods registered with ``needs_head_graph``: the forward with the head's
            graph kept (``features`` a leaf that requires grad), so the method differentiates
            scores of its own without another trunk pass.
    """

    x: Tensor
    activations: Tensor
    gradients: Tensor | None
    targets: Resolved
    logits: Tensor
    native: Tensor
    options: MethodOptions
    batch_size: int
    reshape: Reshape
    split: SplitAccess
    closed_form: GapLinear | None = None
    head_graph: ForwardRecord | None = None

    @property
    def classes(self) -> Tensor:
        """(B, K) explained class ids (-1 for score functions without class ids)."""
        return self.targets.classes

    @property
    def scores(self) -> Scorer:
        """``scores(output, rows) -> (n, K)``: the explained scores of a model output for a
        batch whose row ``i`` comes from image ``rows[i]``."""
        return self.targets.scores

    @property
    def image_size(self) -> tuple[int, ...]:
        """(H, W) (or (D, H, W)) of the input."""
        return tuple(self.x.shape[2:])

    @property
    def rows(self) -> Tensor:
        """(B,) the row index of every image (``scores(output, ctx.rows)`` for the batch)."""
        return torch.arange(self.x.shape[0], device=self.x.device)


RunFn = Callable[[Context], MethodOutput]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the name users pass (``"gradcam"``).
        run: ``(ctx) -> MethodOutput``.
        smooth: ``(ctx) -> (B, K, C, *s)`` weighted activations for ``eigen_smooth``; ``None``
            when the method has no such form.
        eigen_map: ``(ctx) -> (B, K, *s)``: the maps under ``eigen_smooth`` of a method that
            defines them itself (pytorch-grad-cam's FullGrad, KPCA-CAM), instead of the first
            component of ``smooth``.
        options: the method's options class.
        needs_gradients: the engine computes dScore/dA of the explained targets into
            :attr:`Context.gradients` (closed form where it applies).
        needs_head_graph: the engine keeps the head's graph in :attr:`Context.head_graph`.
        double_backward: the method differentiates the head's gradients again, so the head runs
            with kernels that have a double backward (the math attention kernel: the fused
            ones on the CPU have none).
        needs_gap_head: defined only for global-average-pool -> linear heads (classic CAM).
        two_d_only: defined for 2-D images only.
        composition: the method runs other engine calls (several layers, crops): it is
            registered by :mod:`cam_engine.compose`, which runs it above the engine.
    """

    name: str
    run: RunFn
    smooth: Callable[[Context], Tensor] | None = None
    eigen_map: Callable[[Context], Tensor] | None = None
    options: type[MethodOptions] = MethodOptions
    needs_gradients: bool = False
    needs_head_graph: bool = False
    double_backward: bool = False
    needs_gap_head: bool = False
    two_d_only: bool = False
    composition: bool = False

    @property
    def smoothable(self) -> bool:
        """The method has an ``eigen_smooth`` form."""
        return self.smooth is not None or self.eigen_map is not None

    def eigen_smoothed(self, ctx: Context) -> Tensor:
        """The maps (B, K, *s) with ``eigen_smooth``: :attr:`eigen_map`, else the ReLU of the
        first principal component of :attr:`smooth`."""
        if self.eigen_map is not None:
            return self.eigen_map(ctx)
        return first_component(self.smooth(ctx)).relu()


_METHODS: dict[str, Method] = {}


def _reader(fn: Callable[..., Tensor], over_maps: bool) -> Callable[[Context], Tensor]:
    if over_maps:
        return lambda ctx: fn(ctx.activations, ctx.gradients)
    return fn


def _add(name: str, run: Callable[[Context], Any], **flags: Any) -> None:
    def wrapped(ctx: Context) -> MethodOutput:
        out = run(ctx)
        return out if isinstance(out, MethodOutput) else MethodOutput(out)

    _METHODS[name] = Method(name, wrapped, **flags)


def register(
    name: str,
    *,
    over_maps: bool = False,
    smooth: Callable[..., Tensor] | None = None,
    **flags: Any,
) -> Callable[[Callable], Callable]:
    """Decorator adding a method under ``name``.

    ``fn(ctx) -> cams | MethodOutput``, or ``fn(A, G) -> cams`` with ``over_maps``; ``smooth`` is
    read the same way. ``flags``: see :class:`Method`.
    """

    def add(fn: Callable) -> Callable:
        smoothing = None if smooth is None else _reader(smooth, over_maps)
        _add(name, _reader(fn, over_maps), smooth=smoothing, **flags)
        return fn

    return add


def register_weights(
    name: str, *, over_maps: bool = False, **flags: Any
) -> Callable[[Callable], Callable]:
    """Register a channel-weight method: ``weights(ctx)`` (or ``weights(A, G)`` with
    ``over_maps``) ``-> (B, K, C)``.

    The map is ``ReLU(sum_c w_c A_c)``; with ``eigen_smooth`` the first principal component of
    ``w_c A_c`` replaces the sum (pytorch-grad-cam's ``BaseCAM.get_cam_image``). The decorated
    name becomes the map function, taking what ``weights`` takes.
    """

    def add(weights: Callable) -> Callable:
        def maps(*args: Any) -> Tensor:
            a = args[0] if over_maps else args[0].activations
            return weighted_sum(weights(*args), a).relu()

        def smooth(*args: Any) -> Tensor:
            a = args[0] if over_maps else args[0].activations
            return weights(*args)[(...,) + (None,) * (a.ndim - 2)] * a[:, None]

        maps.__doc__, maps.__name__ = weights.__doc__, weights.__name__
        _add(name, _reader(maps, over_maps), smooth=_reader(smooth, over_maps), **flags)
        return maps

    return add


def register_elementwise(name: str, **flags: Any) -> Callable[[Callable], Callable]:
    """Register an element-wise method: ``terms(A, G) -> (B, K, C, *s)``, map = ReLU(sum over C)."""

    def add(terms: Callable) -> Callable:
        def maps(activations: Tensor, gradients: Tensor) -> Tensor:
            return terms(activations, gradients).sum(dim=2).relu()

        maps.__doc__, maps.__name__ = terms.__doc__, terms.__name__
        _add(name, _reader(maps, True), smooth=_reader(terms, True), **flags)
        return maps

    return add


def register_composition(name: str, options: type[MethodOptions], **flags: Any) -> None:
    """List a composition of :mod:`cam_engine.compose` under ``name`` (its ``run`` refuses a
    Context: the engine runs it above the one-layer pipeline)."""

    def run(ctx: Context) -> MethodOutput:
        raise ValueError(f"{name!r} composes other engine calls; run it with CAMEngine")

    _METHODS[name] = Method(name, run, options=options, composition=True, **flags)


def available() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def get(name: str) -> Method:
    """The method called ``name``; ``ValueError`` listing the available ones otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
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
