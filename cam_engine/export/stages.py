"""Which part of an exported CAM graph a node comes from, read from its name.

The TorchScript exporter names nodes by the module path inside the exported module
(:mod:`.graphs`): ``/trunk/...`` the model up to the target layer, ``/head/...`` (global-average
-pool heads) or ``/pools.i/...`` and ``/layers.i/...`` (pool -> MLP heads) the logits,
``/post/...`` the resize, min-max and colours, and top-level nodes (``/TopK``, ``/Gather``,
``/Einsum``) the CAM itself. ONNX Runtime keeps those names through its optimisations (a fused
convolution is named after its output, ``/trunk/relu_3/Relu_output_0_nchwc``) and adds
``ReorderOutput*`` nodes that convert its blocked NCHWc layout back to NCHW. The dynamo exporter
names nodes differently: all of them read as ``"cam"``.
"""

from __future__ import annotations

__all__ = ["STAGES", "stage"]

#: what :func:`stage` returns, in pipeline order
STAGES = ("trunk", "head", "cam", "post", "layout")

_PREFIXES = {"/trunk/": "trunk", "/head/": "head", "/pools.": "head", "/layers.": "head",
             "/post/": "post"}  # fmt: skip


def stage(name: str) -> str:
    """The :data:`STAGES` entry of the node called ``name`` (see the module docstring)."""
    if name.startswith("ReorderOutput"):
        return "layout"
    for prefix, part in _PREFIXES.items():
        if name.startswith(prefix):
            return part
    return "cam"
