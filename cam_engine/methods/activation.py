"""Activation-only methods of pytorch-grad-cam 1.5.7: FEM and KPCA-CAM (class-agnostic maps), and
RandomCAM, the metrics' sanity baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._registry import Context, MethodOptions, check_number, register, register_weights

KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


@dataclass(frozen=True)
class FemOptions(MethodOptions):
    """``k``: how many standard deviations above the mean a position must be (default 2)."""

    k: float = 2.0

    def __post_init__(self) -> None:
        check_number("k", self.k)


@dataclass(frozen=True)
class KpcaOptions(MethodOptions):
    """``kernel`` in :data:`KERNELS` (default ``"sigmoid"``), ``gamma`` (default ``1 / C``)."""

    kernel: str = "sigmoid"
    gamma: float | None = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; use one of {', '.join(KERNELS)}")
        if self.gamma is not None:
            check_number("gamma", self.gamma, positive=True)


@dataclass(frozen=True)
class RandomOptions(MethodOptions):
    """``generator``: a ``torch.Generator`` on the input's device for reproducible weights
    (default: the global RNG)."""

    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {self.generator!r}")


@register_weights("randomcam", options=RandomOptions)
def randomcam(ctx: Context) -> Tensor:
    """pytorch-grad-cam's ``RandomCAM``: channel weights drawn uniformly in [-1, 1), one draw
    (``torch.rand``, in the map's dtype) per image and target; a baseline for the metrics.

    Returns:
        weights (B, K, C).
    """
    a = ctx.activations
    shape = (*ctx.classes.shape, a.shape[1])
    draw = torch.rand(shape, generator=ctx.options.generator, dtype=a.dtype, device=a.device)
    return 2 * draw - 1


@register_weights("fem", options=FemOptions)
def fem(ctx: Context) -> Tensor:
    """FEM, Feature Explanation Method (Fuad et al., 2020): ``w_c`` is the fraction of positions
    where ``A_c > mean(A_c) + k std(A_c)`` (population std, ``k`` from :class:`FemOptions`).

    Returns:
        weights (B, 1, C): the map is the same for every target (the engine broadcasts it).
    """
    flat = ctx.activations.flatten(2)
    k = ctx.options.k
    std, mean = torch.std_mean(flat, dim=-1, correction=0, keepdim=True)
    return (flat > mean + k * std).to(flat.dtype).mean(-1)[:, None]


def _kernel(rows: Tensor, kernel: str, gamma: float) -> Tensor:
    """scikit-learn's ``pairwise_kernels`` (degree 3, coef0 1) of (B, P, C) rows -> (B, P, P)."""
    if kernel == "cosine":
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    dot = rows @ rows.transpose(-1, -2)
    if kernel in ("linear", "cosine"):
        return dot
    if kernel == "poly":
        return (gamma * dot + 1) ** 3
    if kernel == "sigmoid":
        return torch.tanh(gamma * dot + 1)
    squared = rows.square().sum(-1)
    return torch.exp(
        -gamma * (squared[..., :, None] + squared[..., None, :] - 2 * dot).clamp_min(0)
    )


def _kpca_eigen_map(ctx: Context) -> Tensor:
    """pytorch-grad-cam ignores ``eigen_smooth`` for KPCA-CAM: its map is a projection already."""
    return kpca_cam(ctx)


@register("kpca-cam", options=KpcaOptions, eigen_map=_kpca_eigen_map)
def kpca_cam(ctx: Context) -> Tensor:
    """KPCA-CAM (Karmani et al., 2024): the first kernel principal component of the positions.

    pytorch-grad-cam's ``get_2d_projection_kernel`` (scikit-learn ``KernelPCA(n_components=1)``),
    batched on the device: per image, positions are rows, channels columns (centred); the kernel
    matrix is double-centred and the projection is ``v sqrt(lambda)`` for its top eigenpair, with
    scikit-learn's sign (``svd_flip``: the largest-magnitude entry of ``v`` is positive).
    Options: :class:`KpcaOptions`.

    Returns:
        (B, 1, *s), after the ReLU; the same map for every target.
    """
    kernel = ctx.options.kernel
    a = ctx.activations
    a = torch.where(a.isnan(), 0, a)
    rows = a.flatten(2).transpose(1, 2)  # (B, P, C)
    rows = rows - rows.mean(dim=1, keepdim=True)
    gamma = ctx.options.gamma or 1.0 / rows.shape[-1]
    k = _kernel(rows, kernel, gamma)
    k = k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)
    values, vectors = torch.linalg.eigh(k)
    top = vectors[..., -1]  # (B, P): eigh sorts eigenvalues in ascending order
    peak = top.gather(-1, top.abs().argmax(-1, keepdim=True))
    projection = top * peak.sign() * values[..., -1:].clamp_min(0).sqrt()
    return projection.relu().unflatten(-1, a.shape[2:])[:, None]
