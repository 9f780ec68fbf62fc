"""cam-engine: class-activation maps at the speed of plain inference.

Models are rebuilt at the target layer into a gradient-free trunk and a differentiable head, so
Grad-CAM takes ``torch.autograd.grad`` of the explained scores with respect to the feature map and
the backward pass stops there; CAM and Grad-CAM on global-average-pool heads need no backward.
"""

from . import methods, postprocess
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

#: submodules imported on first use: export pulls in onnx / onnxruntime, metrics torchvision ops
_LAZY = ("export", "metrics")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
