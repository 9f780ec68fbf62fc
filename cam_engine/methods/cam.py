"""Class activation mapping (Zhou et al., 2016)."""

from torch import Tensor

from ._registry import register, spatial_mean, weighted_sum


@register("cam", needs_gap_head=True)
def cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """ReLU of the map weighted by the final linear layer's row of each class.

    Defined only for global-average-pool -> linear heads, where dScore/dA = W[c] / (h*w) at every
    position, so the row W[c] is the spatial mean of the gradient times h*w.

    Args:
        activations: (B, C, h, w).
        gradients: (B, K, C, h, w).

    Returns:
        (B, K, h, w).
    """
    positions = activations[0, 0].numel()
    return weighted_sum(spatial_mean(gradients) * positions, activations).relu()
