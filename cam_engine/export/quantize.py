"""int8 copies of a :func:`~cam_engine.export.to_onnx` file, by ONNX Runtime's quantisation.

Only the model's own layers are quantised: the convolutions, matrix products and linear layers
of the trunk and head (:func:`cam_engine.export.stages.stage`). The CAM part (top-k, the FC rows
of the chosen classes, the einsum, the resize, min-max and colours) stays float32, so the maps
keep their [0, 1] range and the engine's normalisation rule; what moves them is the int8
rounding of the target feature map and of the logits that choose the classes. A weight the
CAM part reads too (the FC rows, an MLP head's backward) stays in the file in float32 beside
the quantised node's int8 copy.

- ``"dynamic"``: weights int8, activations quantised per call from their observed range (no
  calibration data). Convolutions become ``ConvInteger``, which ONNX Runtime's CPU provider runs
  without its fused float kernels: measure before using it on CNNs.
- ``"static"``: weights and activations int8 with ranges calibrated on sample inputs (QDQ
  format; ONNX Runtime fuses it into ``QLinearConv`` / ``QLinearMatMul``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import replacing
from .metadata import METADATA_KEY
from .stages import stage

__all__ = ["MODES", "QUANTIZED_OPS", "quantize"]

#: ``mode=`` values of :func:`quantize`
MODES = ("dynamic", "static")
#: the operators quantised (in the trunk and head only)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def quantize(
    path: str | os.PathLike,
    out: str | os.PathLike,
    mode: str = "static",
    calibration: Sequence[np.ndarray] | None = None,
    per_channel: bool = True,
) -> Path:
    """Write an int8 copy of the exported CAM model ``path`` to ``out``.

    The copy keeps the file's inputs, outputs and ``cam_engine`` metadata, so
    :class:`~cam_engine.export.OrtCAM` runs it as it runs the float32 file. ``out`` is written
    beside itself and moved into place when complete.

    Args:
        path: a file written by :func:`~cam_engine.export.to_onnx` (TorchScript exporter: its
            node names tell the trunk and head apart).
        out: the int8 file to write (must differ from ``path``).
        mode: ``"static"`` or ``"dynamic"`` (see the module docstring).
        calibration: for ``"static"``, the ``x`` batches (B, C, H, W) float32 whose activation
            ranges are used; a few real, preprocessed images. Not taken by ``"dynamic"``.
        per_channel: one weight scale per output channel (more accurate than one per tensor).

    Returns:
        ``out`` as a ``Path``.

    Raises:
        ValueError: unknown ``mode``, ``calibration`` missing (static) or given (dynamic), or a
            file with no trunk or head nodes to quantise.
    """
    import onnx
    from onnxruntime import quantization as q

    path, out = Path(path), Path(out)
    if mode not in MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}; available: {', '.join(MODES)}")
    if mode == "static" and not calibration:
        raise ValueError("static quantisation needs calibration batches (calibration=[x, ...])")
    if mode == "dynamic" and calibration is not None:
        raise ValueError("dynamic quantisation takes no calibration data")
    if out.resolve() == path.resolve():
        raise ValueError(f"out must differ from the quantised file {path}")
    model = onnx.load(str(path))
    metadata, description = list(model.metadata_props), model.doc_string
    nodes = _quantizable(model.graph)
    if not nodes:
        raise ValueError(
            f"{path} has no trunk or head {'/'.join(QUANTIZED_OPS)} nodes to quantise (only "
            "files from the TorchScript exporter name them; export with exporter='torchscript')"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as (staged,):
        if mode == "dynamic":
            # its Gemm -> MatMul rewrite renames the nodes it quantises
            gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
            renamed = [f"{name}_MatMul" if name in gemms else name for name in nodes]
            q.quantize_dynamic(
                model, staged, nodes_to_quantize=renamed, per_channel=per_channel,
                weight_type=q.QuantType.QInt8,
            )  # fmt: skip
        else:  # signed activations: unsigned ones saturate without VNNI (the demo model's maps
            # moved 3.6x more on an AVX2 CPU)
            q.quantize_static(
                model, staged, _Batches(calibration), quant_format=q.QuantFormat.QDQ,
                nodes_to_quantize=nodes, per_channel=per_channel,
                activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
            )  # fmt: skip
        _keep_metadata(metadata, description, staged, mode)
    return out


def _quantizable(graph) -> list[str]:
    """The trunk's and head's :data:`QUANTIZED_OPS` nodes, each given its own copy of any
    weight that another node reads too (in place).

    The CAM part reads the head's weights in float32 (the FC rows of the chosen classes, the
    MLP's backward), and the quantiser rewrites a quantised node's weight in place (dynamic mode
    first turns every ``Gemm`` into a ``MatMul``, transposing its weight for all its readers).
    """
    import onnx

    weights = {tensor.name: tensor for tensor in graph.initializer}
    chosen = [
        node
        for node in graph.node
        if node.op_type in QUANTIZED_OPS and stage(node.name) in ("trunk", "head")
    ]
    names = {node.name for node in chosen}
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    for node in chosen:
        for i, name in enumerate(node.input):
            if name in weights and readers[name] - names:
                private = onnx.TensorProto()
                private.CopyFrom(weights[name])
                private.name = f"{name}@{node.name}"
                graph.initializer.append(private)
                node.input[i] = private.name
    return [node.name for node in chosen]


class _Batches:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of ``x`` batches."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = iter([np.ascontiguousarray(b, dtype=np.float32) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"x": batch}


def _keep_metadata(metadata: list, description: str, path: Path, mode: str) -> None:
    """Put the source file's metadata entries back on the quantised file at ``path`` (the
    quantiser drops them) and say in its description that it is int8."""
    import onnx

    model = onnx.load(str(path))
    if not any(entry.key == METADATA_KEY for entry in model.metadata_props):
        for entry in metadata:
            model.metadata_props.add().CopyFrom(entry)
    model.doc_string = f"{description} (int8, {mode} quantisation)"
    onnx.save(model, str(path))
