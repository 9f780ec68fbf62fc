"""ONNX export of the rebuilt graph, and ONNX Runtime and OpenVINO session wrappers.

``to_onnx`` writes a model whose outputs are its logits, the explained classes and their
heatmaps (or colour overlays), computed inside the graph with no hooks and no gradient at run
time; ``OrtCAM`` runs such a file and returns the engine's result type, ``OvCAM`` does the same
on OpenVINO. ``ExportOptions`` holds the export's settings, ``CAMMetadata`` the description
stored in the file.
"""

from .graphs import GapCAM, PoolMLPGradCAM, Postprocess, find_pool_mlp
from .metadata import METADATA_KEY, SCHEMA_VERSION, CAMMetadata
from .openvino import OvCAM
from .options import IMAGENET_MEAN, IMAGENET_STD, ExportOptions
from .quantize import quantize
from .runtime import OrtCAM, OrtResult, default_providers
from .writer import ExportResult, optimize, to_onnx

__all__ = [
    "to_onnx",
    "ExportOptions",
    "ExportResult",
    "CAMMetadata",
    "METADATA_KEY",
    "SCHEMA_VERSION",
    "optimize",
    "quantize",
    "OrtCAM",
    "OvCAM",
    "OrtResult",
    "default_providers",
    "GapCAM",
    "PoolMLPGradCAM",
    "Postprocess",
    "find_pool_mlp",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
