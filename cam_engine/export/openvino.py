"""``OvCAM``: run a file written by :func:`to_onnx` with OpenVINO, called as :class:`OrtCAM`.

OpenVINO reads the ONNX file directly (its ONNX front end keeps the ``metadata_props``, under the
model's ``rt_info["framework"]``). :class:`OvCAM` gives :class:`OrtCAM` a session that runs on an
OpenVINO compiled model, so the checks of images and classes, the results and the metadata
reader (:meth:`CAMMetadata.from_session`) are OrtCAM's own. ``openvino`` is an optional
dependency (``pip install "cam-engine[openvino]"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .metadata import METADATA_KEY, CAMMetadata
from .runtime import OrtCAM

__all__ = ["OvCAM", "OvSession", "F32_CONFIG"]

# Without it, CPUs with bfloat16 units (AMX, AVX512-BF16) run in bfloat16 by default, ~1e-2 off.
F32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(
            'OvCAM needs OpenVINO: pip install "cam-engine[openvino]" (or openvino)'
        ) from exc
    return openvino


class OvSession:
    """An OpenVINO compiled model behind the part of ``onnxruntime.InferenceSession`` that
    :class:`OrtCAM` uses: ``run``, ``get_outputs``, ``get_providers``, ``get_modelmeta``.

    Args:
        path: the ``.onnx`` file.
        device: an OpenVINO device name (``"CPU"``, ``"GPU"``, ``"AUTO"``).
        config: OpenVINO properties; applied over :data:`F32_CONFIG`.
    """

    def __init__(self, path: str | os.PathLike, device: str, config: dict | None) -> None:
        core = _openvino().Core()
        model = core.read_model(str(path))
        where = ["framework", METADATA_KEY]
        self._metadata = (
            {METADATA_KEY: model.get_rt_info(where).astype(str)} if model.has_rt_info(where) else {}
        )
        # the file's output names; compiling adds internal names to the same ports
        self._outputs = [o.get_any_name() for o in model.outputs]
        self.compiled = core.compile_model(model, device, {**F32_CONFIG, **(config or {})})
        self._request = self.compiled.create_infer_request()
        self.device = device

    def get_outputs(self) -> list[SimpleNamespace]:
        """The outputs, each with a ``name``, in the file's order."""
        return [SimpleNamespace(name=name) for name in self._outputs]

    def get_providers(self) -> list[str]:
        return [f"OpenVINO:{self.device}"]

    def get_modelmeta(self) -> SimpleNamespace:
        """``custom_metadata_map``: the file's ``cam_engine`` entry, if it has one."""
        return SimpleNamespace(custom_metadata_map=self._metadata)

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs ``names`` for the inputs ``feed`` (name -> array), as new arrays."""
        self._request.infer(feed)
        # the request's buffers are reused by the next run: copy them out
        return [self._request.get_tensor(name).data.copy() for name in names]


class OvCAM(OrtCAM):
    """OpenVINO on a :func:`to_onnx` file, with :class:`OrtCAM`'s calls and results.

    ``cam(x, targets=...)`` and ``cam.run(x, targets=...)`` take what :class:`OrtCAM` takes and
    check it the same way; ``x`` is a CPU tensor or a NumPy array (NumPy in, NumPy out) and the
    results are on the CPU. OpenVINO runs in float32 unless ``config`` says otherwise. One
    inference request serves the calls: use one ``OvCAM`` per thread.

    Args:
        path: the ``.onnx`` file.
        device: the OpenVINO device (``"CPU"`` default; ``"GPU"`` for an Intel GPU, ``"AUTO"``).
        config: OpenVINO properties, e.g. ``{"INFERENCE_NUM_THREADS": 4}``.

    Example::

        cam = OvCAM("resnet50_cam.onnx")
        res = cam(x.numpy())      # res.heatmaps (B, K, H, W), res.classes, res.logits
    """

    def __init__(
        self, path: str | os.PathLike, device: str = "CPU", config: dict | None = None
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        self.session = OvSession(path, device, config)
        self.cam_metadata = CAMMetadata.from_session(self.session, str(path))
        self.providers = self.session.get_providers()
        self.on_gpu = False  # OrtCAM's CUDA binding; OpenVINO's inputs go through the host
        self.device = torch.device("cpu")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.takes_classes = "classes" in self.cam_metadata.inputs
