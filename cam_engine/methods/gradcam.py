"""Grad-CAM (Selvaraju et al., 2017)."""

from torch import Tensor

from ._registry import register_weights, spatial_mean


@register_weights("gradcam", over_maps=True, needs_gradients=True)
def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """ReLU of the map weighted by the spatial mean of dScore/dA.

    Args:
        activations: (B, C, *s).
        gradients: (B, K, C, *s).

    Returns:
        (B, K, *s) maps (channel weights (B, K, C) inside the registry's wrapper).
    """
    return spatial_mean(gradients)
