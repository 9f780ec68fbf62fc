"""CAM methods: small functions ``(activations, gradients) -> cams`` over a shared interface.

Every method takes the target feature map ``A`` (B, C, h, w) and the gradient of each explained
score with respect to it, ``G`` (B, K, C, h, w), and returns the maps (B, K, h, w) after the
method's ReLU. For a global-average-pool -> linear head ``G`` is a broadcast view (stride 0 over
h, w); :func:`spatial_mean` reads it without expanding it.
"""

from __future__ import annotations

from ._registry import Method, available, get, register, spatial_mean, weighted_sum
from .cam import cam
from .gradcam import gradcam

__all__ = [
    "Method",
    "available",
    "get",
    "register",
    "spatial_mean",
    "weighted_sum",
    "cam",
    "gradcam",
]
