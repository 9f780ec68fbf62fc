"""``OrtCAM``: run a file written by :func:`to_onnx` with ONNX Runtime, get engine-style results."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..engine import CAMResult, check_images
from ..targets import BottomK, Target, Targets, TopK, resolve_classes
from .metadata import CAMMetadata

__all__ = ["OrtCAM", "OrtResult", "default_providers", "run_bound"]

_NUMPY = {torch.float32: np.float32, torch.int64: np.int64, torch.uint8: np.uint8}
_OUTPUT_DTYPES = {
    "logits": torch.float32,
    "classes": torch.int64,
    "heatmaps": torch.float32,
    "overlay": torch.uint8,
}


@dataclass
class OrtResult(CAMResult):
    """:class:`cam_engine.CAMResult` from an ONNX file.

    Its arrays are tensors, or NumPy arrays when the images were. ``cams`` is ``None`` (the file
    outputs the final maps only); ``heatmaps`` is ``None`` and ``overlay`` (B, K, 3, H, W) uint8
    is set for files exported with a colour map.
    """

    overlay: Tensor | np.ndarray | None = None


def _one_keyword(targets: Targets, classes: Targets) -> Targets:
    """``targets``, or ``classes`` (its old name in :meth:`OrtCAM.run`); not both."""
    if targets is not None and classes is not None:
        raise ValueError("pass targets= or classes= (the same thing), not both")
    return classes if targets is None else targets


def _from_numpy(x: np.ndarray) -> Tensor:
    """NumPy images as a CPU tensor, refusing what has no float tensor form."""
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"expected floating-point images, got NumPy {x.dtype}; normalise them first"
        )
    return torch.from_numpy(np.ascontiguousarray(x))


def _tensorrt_loadable() -> bool:
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def default_providers(device: torch.device | None = None) -> list:
    """TensorRT (when its library loads), CUDA, then CPU on a CUDA ``device``; CPU otherwise.

    ``device=None`` means CUDA device 0 when torch sees a GPU. ORT gives each node to the first
    provider in the list that runs it, so TensorRT comes first and CUDA takes what it refuses.
    """
    import onnxruntime as ort

    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", 0)
    chosen: list = []
    if device is not None and device.type == "cuda":
        available = ort.get_available_providers()
        index = device.index if device.index is not None else 0
        if "TensorrtExecutionProvider" in available and _tensorrt_loadable():
            chosen.append(("TensorrtExecutionProvider", {"device_id": index}))
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {"device_id": index}))
    return [*chosen, "CPUExecutionProvider"]


def run_bound(
    session, inputs: dict[str, Tensor], outputs: dict[str, Tensor | None]
) -> dict[str, Tensor]:
    """Run an ONNX Runtime ``session`` on CUDA tensors in place (I/O binding).

    Args:
        session: an ``onnxruntime.InferenceSession`` with the CUDA provider.
        inputs: input name -> contiguous CUDA tensor, read where it lies.
        outputs: output name -> a contiguous CUDA tensor of the output's shape and dtype to be
            written, or ``None`` for an output whose shape is known only after the run (ORT
            allocates it; it is copied back through the host).

    Returns:
        ``outputs`` with every value a CUDA tensor on the inputs' device.
    """
    device = next(iter(inputs.values())).device
    index = device.index if device.index is not None else torch.cuda.current_device()
    binding = session.io_binding()
    for name, tensor in inputs.items():
        binding.bind_input(
            name, "cuda", index, _NUMPY[tensor.dtype], tuple(tensor.shape), tensor.data_ptr()
        )
    for name, out in outputs.items():
        if out is None:
            binding.bind_output(name, "cuda", index)
        else:
            binding.bind_output(
                name, "cuda", index, _NUMPY[out.dtype], tuple(out.shape), out.data_ptr()
            )
    # ORT runs on its own CUDA stream: the inputs must be written before it starts.
    torch.cuda.current_stream(device).synchronize()
    session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    result = dict(outputs)
    if any(out is None for out in outputs.values()):
        host = dict(zip(outputs, binding.copy_outputs_to_cpu(), strict=True))
        for name, out in outputs.items():
            if out is None:
                result[name] = torch.from_numpy(host[name]).to(device)
    return result


class OrtCAM:
    """An ONNX Runtime session on a :func:`to_onnx` file, called like :class:`CAMEngine`.

    CUDA input tensors are bound in place (I/O binding): the inputs are read and the outputs
    written in GPU memory, with no host round trip (except for ``upsample=False`` files, whose
    map size is not known before the run). CPU tensors go through NumPy; NumPy images give NumPy
    results.

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime providers; ``None``: :func:`default_providers`.
        device: where results are returned and, for CUDA, which GPU runs the session; ``None``:
            the GPU when a CUDA provider is active, else the CPU.
        session_options: ``onnxruntime.SessionOptions``.

    Example::

        cam = OrtCAM("resnet50_cam.onnx")
        res = cam(x)              # res.heatmaps (B, K, H, W), res.classes, res.logits
        res = cam(x.numpy())      # the same as NumPy arrays, for code without tensors
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: list | None = None,
        device: torch.device | str | None = None,
        session_options=None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        device = torch.device(device) if device is not None else None
        self.session = ort.InferenceSession(
            str(path), session_options, providers=providers or default_providers(device)
        )
        self.cam_metadata = CAMMetadata.from_session(self.session, str(path))
        self.providers: list[str] = self.session.get_providers()
        self.on_gpu = any(
            p in self.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        )
        if device is None:
            device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")
        self.device = device
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.takes_classes = "classes" in self.cam_metadata.inputs

    @property
    def metadata(self) -> dict:
        """The file's metadata as stored (a JSON object; :attr:`cam_metadata` is the typed
        form, :mod:`cam_engine.export.metadata` documents the keys)."""
        return self.cam_metadata.to_dict()

    @property
    def topk(self) -> int:
        """Classes explained per image without a ``classes`` input."""
        return self.cam_metadata.topk

    def run(
        self, x: Tensor | np.ndarray, targets: Targets = None, *, classes: Targets = None
    ) -> dict[str, Tensor] | dict[str, np.ndarray]:
        """The file's outputs by name: tensors on :attr:`device`, or NumPy arrays for NumPy ``x``.

        Args:
            x: (B, C, H, W) float images, a tensor or a NumPy array: C (and without
                ``dynamic_batch`` B) as exported; (H, W) the export's ``input_size``, or with
                ``dynamic_size`` at least the file's ``min_input_size``.
            targets: for files exported with ``classes_input=True`` (and only for them), class
                ids as :class:`cam_engine.CAMEngine` takes them: an int (every image), (B,) (one
                per image) or (B, K); integers in [0, num_classes).
            classes: the old name of ``targets``, kept for old code.

        Raises:
            ValueError: images or classes the file cannot take (see above).
        """
        targets = _one_keyword(targets, classes)
        as_numpy = isinstance(x, np.ndarray)
        if as_numpy:
            x = _from_numpy(x)
        check_images(x)
        self.cam_metadata.check_input(x.shape)
        if self.takes_classes != (targets is not None):
            need = "needs classes (B, K)" if self.takes_classes else "takes no classes input"
            raise ValueError(f"this file {need}")
        x = x.detach().float().contiguous()
        ids = self._class_ids(targets, x).contiguous() if targets is not None else None
        if x.is_cuda and self.on_gpu:
            return self._run_bound(x, ids)
        feed = {"x": x.cpu().numpy()}
        if ids is not None:
            feed["classes"] = ids.cpu().numpy()
        values = dict(
            zip(self.output_names, self.session.run(self.output_names, feed), strict=True)
        )
        if ids is not None:  # files with a classes input do not output them again
            values["classes"] = feed["classes"]
        if as_numpy:
            return values
        return {name: torch.from_numpy(value).to(self.device) for name, value in values.items()}

    def _class_ids(self, classes: Targets, x: Tensor) -> Tensor:
        """(B, K) long ``classes`` on ``x``'s device; ``ValueError`` unless they are class ids."""
        if isinstance(classes, TopK | BottomK | Target) or callable(classes):
            raise ValueError(
                "this file explains given classes: pass class ids (an int, (B,) or (B, K) "
                f"integers), not {type(classes).__name__}"
            )
        shape = (x.shape[0], self.cam_metadata.num_classes)
        # only the shape and device of the logits are read for class ids
        return resolve_classes(classes, x.new_empty(()).expand(shape))

    def _with_classes(self, out: dict[str, Tensor], classes: Tensor | None) -> dict[str, Tensor]:
        # files with a classes input do not output them again (an ONNX name is unique)
        if classes is not None:
            out["classes"] = classes.to(self.device)
        return out

    def _run_bound(self, x: Tensor, classes: Tensor | None) -> dict[str, Tensor]:
        inputs = {"x": x} if classes is None else {"x": x, "classes": classes}
        k = classes.shape[1] if classes is not None else self.topk
        shapes = self._output_shapes(x, k)
        outputs = {
            name: None
            if shapes.get(name) is None  # size known only after the run
            else torch.empty(shapes[name], dtype=_OUTPUT_DTYPES[name], device=x.device)
            for name in self.output_names
        }
        out = run_bound(self.session, inputs, outputs)
        return self._with_classes({n: t.to(self.device) for n, t in out.items()}, classes)

    def _output_shapes(self, x: Tensor, k: int) -> dict[str, tuple[int, ...] | None]:
        batch, _, height, width = x.shape
        maps = (batch, k, height, width) if self.cam_metadata.upsample else None
        return {
            "logits": (batch, self.cam_metadata.num_classes),
            "classes": (batch, k),
            "heatmaps": maps,
            "overlay": (batch, k, 3, height, width),
        }

    def __call__(
        self, x: Tensor | np.ndarray, targets: Targets = None, *, classes: Targets = None
    ) -> OrtResult:
        """Explain a batch, as :class:`cam_engine.CAMEngine` does.

        Args:
            x: (B, C, H, W) float images: a CPU or CUDA tensor, or a NumPy array (the result's
                arrays are then NumPy arrays too).
            targets: ``None`` or ``TopK(j)`` with ``j <= topk`` for files without a classes
                input (the first ``j`` maps); class ids (int, (B,), (B, K)) for files with one.
            classes: another name of ``targets``, as :meth:`run` takes it.

        Raises:
            ValueError: as :meth:`run`, or targets the file cannot explain.
        """
        targets = _one_keyword(targets, classes)
        classes, keep = None, None
        if self.takes_classes:
            if targets is None:
                raise ValueError("this file explains given classes: pass targets= class ids")
            classes = targets  # checked by run
        elif targets is not None:
            if not isinstance(targets, TopK) or targets.k > self.topk:
                raise ValueError(
                    f"this file explains its top-{self.topk} classes; targets may be None or "
                    f"TopK(k <= {self.topk}). Export with classes_input=True to choose classes"
                )
            keep = targets.k
        out = self.run(x, classes)
        overlay = out.get("overlay")
        return OrtResult(
            heatmaps=out["heatmaps"][:, :keep] if "heatmaps" in out else None,
            cams=None,
            logits=out["logits"],
            classes=out["classes"][:, :keep],
            overlay=overlay[:, :keep] if overlay is not None else None,
        )
