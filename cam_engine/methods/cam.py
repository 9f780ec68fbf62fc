"""Class activation mapping (Zhou et al., 2016)."""

from torch import Tensor

from ._registry import register_weights, spatial_mean


@register_weights("cam", over_maps=True, needs_gradients=True, needs_gap_head=True)
def cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """ReLU of the map weighted by the final linear layer's row of each class.

    Defined only for global-average-pool -> linear heads, where dScore/dA = W[c] / (h*w) at every
    position, so the row W[c] is the spatial mean of the gradient times h*w.

    Args:
        activations: (B, C, *s).
        gradients: (B, K, C, *s).

    Returns:
        (B, K, *s) maps (channel weights (B, K, C) inside the registry's wrapper).
    """
    positions = activations[0, 0].numel()
    return spatial_mean(gradients) * positions
