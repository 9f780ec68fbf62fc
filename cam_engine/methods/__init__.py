"""CAM methods: pure functions over a shared input, registered by name.

Every method is ``Method.run(ctx: Context) -> MethodOutput``. Gradient and activation methods
are written over the target feature map ``A`` (B, C, *s) and the gradient of each explained
score with respect to it, ``G`` (B, K, C, *s), and return the maps (B, K, *s) after the method's
ReLU. For a global-average-pool -> linear head ``G`` is a broadcast view (stride 0 over space);
:func:`spatial_mean` reads it without expanding it. Methods that need more (the model run on
other inputs, other gradients) read the whole :class:`Context`. This package imports nothing
from the engine or the model: what a method needs of the split model comes through
:attr:`Context.split`. The meta-methods ``refinecam`` and ``sess`` are compositions of engine
calls (:mod:`cam_engine.compose`), listed here by name.
"""

from __future__ import annotations

from ._registry import (
    Context,
    Method,
    MethodOptions,
    MethodOutput,
    SplitAccess,
    available,
    check_count,
    check_number,
    first_component,
    get,
    register,
    register_composition,
    register_elementwise,
    register_weights,
    spatial_mean,
    spatial_sum,
    weighted_sum,
)
from .activation import FemOptions, KpcaOptions, RandomOptions, fem, kpca_cam, randomcam
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
    segeigencam,
    xgradcam,
)
from .guided import GuidedReLU, guided_backprop, guided_gradcam
from .legrad import LegradOptions, legrad
from .perturbation import ablationcam, scorecam
from .rescored import FinerOptions, finer_scores, finercam, shapleycam
from .smoothed import (
    ISCamOptions,
    NoiseOptions,
    SSCamOptions,
    iscam,
    smoothgradcam_plus_plus,
    sscam,
)

__all__ = [
    "Context",
    "Method",
    "MethodOptions",
    "MethodOutput",
    "SplitAccess",
    "available",
    "check_count",
    "check_number",
    "first_component",
    "get",
    "register",
    "register_composition",
    "register_elementwise",
    "register_weights",
    "spatial_mean",
    "spatial_sum",
    "weighted_sum",
    "FemOptions",
    "KpcaOptions",
    "RandomOptions",
    "FinerOptions",
    "LegradOptions",
    "NoiseOptions",
    "SSCamOptions",
    "ISCamOptions",
    "cam",
    "gradcam",
    "gradcam_plus_plus",
    "xgradcam",
    "layercam",
    "hirescam",
    "gradcam_elementwise",
    "eigencam",
    "eigengradcam",
    "segeigencam",
    "scorecam",
    "ablationcam",
    "fullgrad",
    "guided_backprop",
    "guided_gradcam",
    "GuidedReLU",
    "fem",
    "kpca_cam",
    "randomcam",
    "shapleycam",
    "finercam",
    "finer_scores",
    "smoothgradcam_plus_plus",
    "sscam",
    "iscam",
    "legrad",
]
