"""Grad-CAM (Selvaraju et al., 2017)."""

from torch import Tensor

from ._registry import register, spatial_mean, weighted_sum


@register("gradcam")
def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """ReLU of the map weighted by the spatial mean of dScore/dA.

    Args:
        activations: (B, C, h, w).
        gradients: (B, K, C, h, w).

    Returns:
        (B, K, h, w).
    """
    return weighted_sum(spatial_mean(gradients), activations).relu()
