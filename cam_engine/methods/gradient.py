"""Gradient-weighted methods over (A, G), defined as pytorch-grad-cam 1.5.7 defines them.

Every function takes ``A`` (B, C, *s) and ``G`` (B, K, C, *s) (``*s`` = (h, w) or (d, h, w)) and
is batched over images B and targets K. Channel-weight functions return weights (B, K, C), the
registry turns them into ``ReLU(sum_c w_c A_c)``; element-wise ones return the terms
(B, K, C, *s) that are summed over C.
"""

import torch
from torch import Tensor

from ._registry import (
    first_component,
    register,
    register_elementwise,
    register_weights,
    spatial_sum,
)


@register_weights("gradcam++", over_maps=True, needs_gradients=True)
def gradcam_plus_plus(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., 2018), eq. 19 with the exponential-score shortcut.

    ``alpha = g^2 / (2 g^2 + sum(A) g^3 + 1e-6)`` (0 where g == 0), ``w = sum(alpha relu(g))``.
    """
    g = gradients
    g2 = g * g
    sum_a = spatial_sum(activations)[:, None]
    alpha = g2 / (2 * g2 + sum_a * g2 * g + 1e-6)
    alpha = alpha.masked_fill(g == 0, 0)
    return (alpha * g.relu()).sum(dim=tuple(range(3, g.ndim)))


@register_weights("xgradcam", over_maps=True, needs_gradients=True)
def xgradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., 2020): ``w = sum(g A) / (sum(A) + 1e-7)``."""
    a = activations[:, None]
    return (gradients * a / (spatial_sum(a, 3) + 1e-7)).sum(dim=tuple(range(3, a.ndim)))


@register_elementwise("layercam", needs_gradients=True)
def layercam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Layer-CAM (Jiang et al., 2021): ``relu(g) * A`` per position."""
    return gradients.relu() * activations[:, None]


@register_elementwise("hirescam", needs_gradients=True)
def hirescam(activations: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, 2020): ``g * A`` per position (ReLU after the channel sum)."""
    return gradients * activations[:, None]


@register_elementwise("gradcam-elementwise", needs_gradients=True)
def gradcam_elementwise(activations: Tensor, gradients: Tensor) -> Tensor:
    """Element-wise Grad-CAM: ``relu(g * A)`` per position."""
    return (gradients * activations[:, None]).relu()


def _grad_times_activation(activations: Tensor, gradients: Tensor) -> Tensor:
    return gradients * activations[:, None]


def _activation(activations: Tensor, gradients: None) -> Tensor:
    return activations[:, None]


@register("eigengradcam", over_maps=True, smooth=_grad_times_activation, needs_gradients=True)
def eigengradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Eigen-Grad-CAM: ReLU of the first principal component of ``g * A``."""
    return first_component(_grad_times_activation(activations, gradients)).relu()


@register("eigencam", over_maps=True, smooth=_activation)
def eigencam(activations: Tensor, gradients: None) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin, 2020): ReLU of the first principal component of ``A``.

    Class-agnostic: the K maps of an image are the same map (a broadcast view, not copies).

    Returns:
        (B, 1, *s); the engine broadcasts it to (B, K, *s).
    """
    return first_component(_activation(activations, gradients)).relu()


def _salient_positive(projection: Tensor) -> Tensor:
    """Seg-Eigen-CAM's sign correction (eq. 13): each map (B, K, *s) negated where its minimum is
    larger in magnitude than its maximum, so the choice of the SVD's sign does not matter."""
    flat = projection.flatten(2)
    flip = flat.amin(-1).abs() > flat.amax(-1).abs()
    return torch.where(flip[(...,) + (None,) * (projection.ndim - 2)], -projection, projection)


@register(
    "segeigencam",
    over_maps=True,
    needs_gradients=True,
    eigen_map=lambda ctx: segeigencam(ctx.activations, ctx.gradients),
)
def segeigencam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Seg-Eigen-CAM (Chung & Ying, 2025): ReLU of the first principal component of ``|g| * A``,
    its sign chosen so that the larger extreme is positive (pytorch-grad-cam's ``SegEigenCAM``,
    which ignores ``eigen_smooth``: so does this, the map is a projection already).

    Returns:
        (B, K, *s).
    """
    return _salient_positive(first_component(gradients.abs() * activations[:, None])).relu()
