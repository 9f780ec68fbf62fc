"""cam-engine: class-activation maps at the speed of plain inference.

Models are rebuilt at the target layer into a gradient-free trunk and a differentiable head, so
Grad-CAM takes ``torch.autograd.grad`` of the explained scores with respect to the feature map and
the backward pass stops there; CAM and Grad-CAM on global-average-pool heads need no backward.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import export, methods, metrics, postprocess
    from .engine import CAMEngine, CAMResult
    from .model import CAMModel, wrap
    from .postprocess import overlay
    from .targets import BottomK, TopK

__all__ = [
    "CAMEngine",
    "CAMResult",
    "CAMModel",
    "wrap",
    "TopK",
    "BottomK",
    "overlay",
    "methods",
    "postprocess",
    "export",
    "metrics",
]
__version__ = "0.1.0"

#: every public name is imported on first use, so that ``import cam_engine`` (and with it
#: ``cam-engine --help``) does not load torch: export pulls in onnx / onnxruntime as well
_LAZY = {
    "CAMEngine": "engine",
    "CAMResult": "engine",
    "CAMModel": "model",
    "wrap": "model",
    "overlay": "postprocess",
    "TopK": "targets",
    "BottomK": "targets",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    # any submodule as an attribute (``ce.methods``, ``ce.targets.BinaryScore``), as when this
    # package imported them all
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
