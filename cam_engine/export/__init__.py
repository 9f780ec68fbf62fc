"""ONNX export of the rebuilt graph, and an ONNX Runtime session wrapper.

``to_onnx`` writes a model whose outputs are its logits, the explained classes and their
heatmaps (or colour overlays), computed inside the graph with no hooks and no gradient at run
time; ``OrtCAM`` runs such a file and returns the engine's result type.
"""

from .graphs import GapCAM, PoolMLPGradCAM, Postprocess, find_pool_mlp
from .runtime import OrtCAM, OrtResult, default_providers
from .writer import IMAGENET_MEAN, IMAGENET_STD, ExportResult, optimize, to_onnx

__all__ = [
    "to_onnx",
    "ExportResult",
    "optimize",
    "OrtCAM",
    "OrtResult",
    "default_providers",
    "GapCAM",
    "PoolMLPGradCAM",
    "Postprocess",
    "find_pool_mlp",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
