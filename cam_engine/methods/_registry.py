"""The method registry and the tensor helpers methods share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MethodFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the name users pass (``"gradcam"``).
        fn: ``(A (B, C, h, w), G (B, K, C, h, w)) -> cams (B, K, h, w)``.
        needs_gap_head: defined only for global-average-pool -> linear heads (classic CAM).
    """

    name: str
    fn: MethodFn
    needs_gap_head: bool = False


_METHODS: dict[str, Method] = {}


def register(name: str, *, needs_gap_head: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method function to the registry under ``name``."""

    def add(fn: MethodFn) -> MethodFn:
        _METHODS[name] = Method(name, fn, needs_gap_head)
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


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """Channel-weighted sum of the map: (B, K, C) x (B, C, *spatial) -> (B, K, *spatial)."""
    return torch.einsum("bkc,bc...->bk...", weights, activations)
