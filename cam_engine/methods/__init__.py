"""CAM methods: small functions over a shared interface, registered by name.

Gradient and activation methods take the target feature map ``A`` (B, C, *s) and the gradient of
each explained score with respect to it, ``G`` (B, K, C, *s), and return the maps (B, K, *s) after
the method's ReLU. For a global-average-pool -> linear head ``G`` is a broadcast view (stride 0
over space); :func:`spatial_mean` reads it without expanding it. Methods that need more (the model,
the head, other gradients) take a :class:`Context` instead (``Method.needs_context``).
"""

from __future__ import annotations

from ._registry import (
    Context,
    Method,
    available,
    first_component,
    get,
    register,
    register_elementwise,
    register_weights,
    spatial_mean,
    spatial_sum,
    weighted_sum,
)
from .activation import fem, kpca_cam
from .cam import cam
from .fullgrad import fullgrad
from .gradcam import gradcam
from .gradient import (
    eigencam,
    eigengradcam,
    gradcam_elementwise,
    gradcam_plus_plus,
    hirescam,
    layercam,
    xgradcam,
)
from .guided import GuidedReLU, guided_backprop, guided_gradcam
from .legrad import legrad
from .meta import refinecam, sess
from .perturbation import ablationcam, scorecam
from .rescored import finer_scores, finercam, shapleycam
from .smoothed import iscam, smoothgradcam_plus_plus, sscam

__all__ = [
    "Context",
    "Method",
    "available",
    "first_component",
    "get",
    "register",
    "register_elementwise",
    "register_weights",
    "spatial_mean",
    "spatial_sum",
    "weighted_sum",
    "cam",
    "gradcam",
    "gradcam_plus_plus",
    "xgradcam",
    "layercam",
    "hirescam",
    "gradcam_elementwise",
    "eigencam",
    "eigengradcam",
    "scorecam",
    "ablationcam",
    "fullgrad",
    "guided_backprop",
    "guided_gradcam",
    "GuidedReLU",
    "fem",
    "kpca_cam",
    "shapleycam",
    "finercam",
    "finer_scores",
    "smoothgradcam_plus_plus",
    "sscam",
    "iscam",
    "refinecam",
    "sess",
    "legrad",
]
