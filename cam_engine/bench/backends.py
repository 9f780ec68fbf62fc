"""The ways of computing the same heatmaps that the benchmark compares.

Every backend explains the top-1 predicted class of each image and ends with the same product:
heatmaps (B, 1, H, W) in [0, 1] at the input's size. Libraries that stop at the low-resolution
map (torchcam, captum) are finished with :func:`cam_engine.postprocess.heatmaps`, as their users
would have to do; the table says so in the backend's note.

A backend is prepared once per (model, method, batch) into a :class:`Prepared`: the timed call
and a function turning its output into heatmaps, so that the harness can check that all backends
computed the same maps before timing them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import postprocess
from ..engine import CAMEngine
from ..model import wrap
from ..reference import HookGradCAM, reference_cam

__all__ = [
    "BACKENDS",
    "Backend",
    "Case",
    "Prepared",
    "Unavailable",
    "available",
    "get",
    "fc_name",
    "PgcCAM",
    "PGC_CLASSES",
    "ort_cam_file",
    "ort_plain_file",
]


class Unavailable(Exception):
    """A backend cannot run this case (missing library, unsupported method or model)."""


@dataclass
class Case:
    """One benchmark case: a model, its target layer, a method and an input batch.

    Attributes:
        model: classifier in eval mode on ``x``'s device.
        layer: target module name (the engine's choice when not given).
        method: a :func:`cam_engine.methods.available` name.
        x: (B, 3, H, W) input batch.
        workdir: where exported model files are written (and reused).
        tag: a file-name-safe id of the model and input shape, for exported files.
        fc: name of the final linear layer of a global-average-pool head (``None`` if the
            head is not one); found before any backend hooks the model (see :func:`fc_name`).
        compile_mode: ``torch.compile``'s ``mode`` for ``engine-compile`` (``None``: default).
    """

    model: nn.Module
    layer: str
    method: str
    x: Tensor
    workdir: Path
    tag: str
    fc: str | None = None
    compile_mode: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.x.shape[-2:])

    @property
    def module(self) -> nn.Module:
        try:
            return self.model.get_submodule(self.layer)
        except AttributeError as exc:
            raise Unavailable(
                f"target {self.layer!r} is not a module name (hooks need one)"
            ) from exc


def _nothing() -> None:
    return None


@dataclass
class Prepared:
    """A backend ready to run one case.

    Hook-based libraries register their hooks in ``attach`` and remove them in ``detach``, so
    that while one backend is timed no other backend's hooks fire on the shared model.

    Attributes:
        call: the timed work, ``call(x)``; only valid between ``attach()`` and ``detach()``.
        heatmaps: output of ``call`` -> (B, K, H, W) heatmaps, ``None`` for plain inference.
        attach: registers the backend's hooks (untimed).
        detach: removes them and clears parameter gradients (untimed).
    """

    call: Callable[[Tensor], Any]
    heatmaps: Callable[[Any], Tensor] | None = None
    attach: Callable[[], None] = _nothing
    detach: Callable[[], None] = _nothing

    def run(self, x: Tensor) -> Any:
        """``call(x)`` with the hooks attached for its duration."""
        self.attach()
        try:
            return self.call(x)
        finally:
            self.detach()


@dataclass(frozen=True)
class Backend:
    """A registered backend.

    Attributes:
        name: command-line name.
        prepare: ``Case -> Prepared``; raises :class:`Unavailable` with the reason.
        baseline: the plain-inference backend its "explain overhead" is relative to (``None``
            for the plain backends themselves).
        methods: the methods it implements; ``None``: every registered method. Plain backends
            (``baseline`` ``None``) run once per model, whatever the methods.
        note: a caveat printed in the table.
    """

    name: str
    prepare: Callable[[Case], Prepared]
    baseline: str | None = "plain"
    methods: tuple[str, ...] | None = None
    note: str = ""


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{package} is not installed ({exc})") from exc


def fc_name(model: nn.Module, layer: str) -> str | None:
    """Name of the linear layer a global-average-pool head after ``layer`` ends with, or None.

    Call it before any library registers hooks on ``model``: hooks can change how it traces.
    """
    gap = wrap(model, layer).gap_linear
    if gap is not None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight is gap.weight:
                return name
    return None


def _top1(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


# Plain inference -------------------------------------------------------------------------------


def _plain(case: Case) -> Prepared:
    model = case.model

    def call(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return Prepared(call)


# cam-engine --------------------------------------------------------------------------------------


def _engine(case: Case, **options: Any) -> Prepared:
    """``CAMEngine`` on the case, with ``options`` (``compile=``, ``channels_last=``)."""
    try:
        engine = CAMEngine(case.model, case.layer, case.method, **options)
    except ValueError as exc:
        raise Unavailable(str(exc)) from exc
    return Prepared(engine, lambda res: res.heatmaps)


def _engine_nchw(case: Case) -> Prepared:
    return _engine(case, channels_last=False)


def _engine_compiled(case: Case) -> Prepared:
    prepared = _engine(case, compile={"mode": case.compile_mode} if case.compile_mode else True)
    try:
        prepared.call(case.x)  # compile now: a failure is a skip, not a crash mid-benchmark
    except Exception as exc:  # inductor raises many kinds (no compiler, unsupported op, ...)
        reason = f"torch.compile failed: {type(exc).__name__}: {exc}".split("\n")[0]
        raise Unavailable(reason) from exc
    return prepared


# The hook-based reference (cam_engine/reference.py) --------------------------------------------


def _reference(case: Case) -> Prepared:
    module = case.module
    if case.method == "gradcam":
        return Prepared(HookGradCAM(case.model, module), lambda res: res.heatmaps)
    if case.fc is None:
        raise Unavailable("CAM needs a global-average-pool -> linear head; this model has none")
    fc = case.model.get_submodule(case.fc)
    return Prepared(lambda x: reference_cam(case.model, module, fc, x), lambda res: res.heatmaps)


# pytorch-grad-cam --------------------------------------------------------------------------------


#: pytorch-grad-cam 1.5.7's class for each method of ours that it defines
PGC_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "fullgrad": "FullGrad",
    "fem": "FEM",
    "kpca-cam": "KPCA_CAM",
    "shapleycam": "ShapleyCAM",
    "finercam": "FinerCAM",
    "segeigencam": "SegEigenCAM",
}


class PgcCAM:
    """pytorch-grad-cam's class for ``method`` (default: the case's) on a case's model and
    layer, hooked between :meth:`attach` and :meth:`detach`.

    ``explainer(x)`` -> heatmaps (B, H, W) NumPy float32 of each image's top-1 class;
    ``explainer(x, c)`` -> those of class ``c`` for every image.
    """

    def __init__(self, case: Case, method: str | None = None) -> None:
        self.pgc = _import("pytorch_grad_cam", "grad-cam (pytorch-grad-cam)")
        self.targets = _import("pytorch_grad_cam.utils.model_targets", "grad-cam")
        method = method or case.method
        if method not in PGC_CLASSES:
            raise Unavailable(f"pytorch-grad-cam has no {method!r}")
        self.cls = getattr(self.pgc, PGC_CLASSES[method])
        self.model, self.module = case.model, case.module
        self.explainer: Any = None

    def attach(self) -> None:
        self.explainer = self.cls(self.model, [self.module])

    def detach(self) -> None:
        # FinerCAM keeps its hooks in the method it wraps
        holder = getattr(self.explainer, "base_cam", self.explainer)
        holder.activations_and_grads.gradients = []  # ShapleyCAM's keep a graph alive
        holder.activations_and_grads.release()
        self.explainer = None
        self.model.zero_grad(set_to_none=True)

    def __call__(self, x: Tensor, c: int | None = None) -> Any:
        targets = None if c is None else [self.targets.ClassifierOutputTarget(c)] * len(x)
        return self.explainer(x, targets=targets)


def _pytorch_grad_cam(case: Case) -> Prepared:
    explainer = PgcCAM(case)
    device = case.x.device
    return Prepared(
        explainer,
        lambda out: torch.from_numpy(out)[:, None].to(device),
        explainer.attach,
        explainer.detach,
    )


# torchcam ----------------------------------------------------------------------------------------


class _TorchCAM:
    """torchcam's ``GradCAM`` or ``CAM`` extractor, hooked between attach and detach; calls
    return heatmaps (B, 1, H, W) of each image's top-1 class."""

    def __init__(self, case: Case) -> None:
        self.methods = _import("torchcam.methods", "torchcam")
        self.case = case
        if case.method == "cam" and case.fc is None:
            raise Unavailable("CAM needs a global-average-pool -> linear head; this model has none")
        self.extractor: Any = None

    def attach(self) -> None:
        case = self.case
        shape = tuple(case.x.shape[1:])
        if case.method == "gradcam":
            self.extractor = self.methods.GradCAM(case.model, case.layer, input_shape=shape)
        else:
            self.extractor = self.methods.CAM(
                case.model, case.layer, fc_layer=case.fc, input_shape=shape
            )

    def detach(self) -> None:
        self.extractor.remove_hooks()
        self.extractor = None
        self.case.model.zero_grad(set_to_none=True)

    def __call__(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.case.method == "gradcam"):
            scores = self.case.model(x)  # torchcam hooks this forward, then backpropagates
        (cams,) = self.extractor(class_idx=scores.argmax(1).tolist(), scores=scores)
        return postprocess.heatmaps(cams[:, None], self.case.size)


def _torchcam(case: Case) -> Prepared:
    extractor = _TorchCAM(case)
    return Prepared(extractor, lambda out: out, extractor.attach, extractor.detach)


# captum ------------------------------------------------------------------------------------------


def _captum(case: Case) -> Prepared:
    attr = _import("captum.attr", "captum")
    explainer = attr.LayerGradCam(case.model, case.module)
    size = case.size

    def call(x: Tensor) -> Tensor:
        # captum has no "predicted class" target: its users run a forward pass to find it
        cams = explainer.attribute(x, target=_top1(case.model, x), relu_attributions=True)
        return postprocess.heatmaps(cams.detach(), size)

    return Prepared(call, lambda out: out, detach=lambda: case.model.zero_grad(set_to_none=True))


# ONNX Runtime ------------------------------------------------------------------------------------


def _onnx_runtime(case: Case) -> Any:
    """The ``onnxruntime`` module, when it can run ``case`` (float32; CUDA provider on a GPU)."""
    if torch.is_autocast_enabled(case.x.device.type):
        raise Unavailable("ONNX Runtime runs the float32 file: autocast is for PyTorch backends")
    ort = _import("onnxruntime", "onnxruntime")
    if case.x.is_cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Unavailable("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    return ort


def ort_cam_file(case: Case, topk: int = 1, int8: str | None = None) -> Path:
    """The case's exported CAM model explaining ``topk`` classes (made once per workdir), or
    its ``int8`` (``"static"`` / ``"dynamic"``) quantised copy."""
    export = _import("cam_engine.export", "cam_engine.export (the ONNX export issue)")
    name = f"{case.tag}-{case.method}-cam" + (f"-top{topk}" if topk > 1 else "")
    path = case.workdir / f"{name}.onnx"
    if not path.exists():
        try:
            export.to_onnx(
                case.model,
                path,
                target_layer=case.layer,
                method=case.method,
                topk=topk,
                input_size=case.size,
            )
        except (ValueError, NotImplementedError) as exc:
            raise Unavailable(f"export failed: {exc}") from exc
    if int8 is None:
        return path
    quantized = case.workdir / f"{name}-int8-{int8}.onnx"
    if not quantized.exists():
        # static ranges from other images than the timed batch, of the same distribution
        generator = torch.Generator().manual_seed(1)
        calibration = [torch.randn(case.x.shape, generator=generator).numpy()]
        export.quantize(path, quantized, int8, calibration if int8 == "static" else None)
    return quantized


def _ort_cam(case: Case, topk: int = 1, int8: str | None = None) -> Prepared:
    _onnx_runtime(case)
    from ..export import OrtCAM

    session = OrtCAM(ort_cam_file(case, topk, int8), device=case.x.device)
    # every row is checked on the top-1 map
    return Prepared(session, lambda res: res.heatmaps[:, :1])


def _ort_cam_top3(case: Case) -> Prepared:
    return _ort_cam(case, topk=3)


def _ort_cam_int8(case: Case) -> Prepared:
    return _ort_cam(case, int8="static")


def _ort_cam_int8_dynamic(case: Case) -> Prepared:
    return _ort_cam(case, int8="dynamic")


def ort_plain_file(case: Case) -> Path:
    """The case's model exported as it is, logits only (made once per workdir)."""
    path = case.workdir / f"{case.tag}-plain.onnx"
    if not path.exists():
        with torch.no_grad():
            torch.onnx.export(
                case.model, (case.x,), path, dynamo=True, external_data=False, verbose=False
            )
    return path


def _ort_plain(case: Case) -> Prepared:
    """The plain ONNX model; on CUDA its input and logits stay in GPU memory, as ``ort-cam``'s."""
    from ..export.runtime import default_providers, run_bound

    ort = _onnx_runtime(case)
    path = ort_plain_file(case)
    session = ort.InferenceSession(str(path), providers=default_providers(case.x.device))
    (source,), (target,) = session.get_inputs(), session.get_outputs()
    if not case.x.is_cuda:
        return Prepared(
            lambda x: torch.from_numpy(session.run(None, {source.name: x.detach().numpy()})[0])
        )
    with torch.no_grad():
        num_classes = case.model(case.x[:1]).shape[-1]

    def call(x: Tensor) -> Tensor:
        x = x.detach().float().contiguous()
        logits = torch.empty(x.shape[0], num_classes, device=x.device)
        return run_bound(session, {source.name: x}, {target.name: logits})[target.name]

    return Prepared(call)


# OpenVINO ----------------------------------------------------------------------------------------


def _openvino(case: Case) -> None:
    """``Unavailable`` unless OpenVINO can run ``case`` (installed; CPU float32 inputs)."""
    _import("openvino", "openvino")
    if case.x.is_cuda or torch.is_autocast_enabled(case.x.device.type):
        raise Unavailable("OpenVINO runs the float32 file on the CPU here")


def _ov_cam(case: Case) -> Prepared:
    _openvino(case)
    from ..export import OvCAM

    return Prepared(OvCAM(ort_cam_file(case)), lambda res: res.heatmaps)


def _ov_plain(case: Case) -> Prepared:
    _openvino(case)
    from ..export.openvino import OvSession

    session = OvSession(ort_plain_file(case), "CPU", None)
    (output,) = session.get_outputs()
    (source,) = session.compiled.inputs
    feed = source.get_any_name()
    return Prepared(
        lambda x: torch.from_numpy(session.run([output.name], {feed: x.detach().numpy()})[0])
    )


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("plain", _plain, baseline=None),
        Backend("engine", _engine),
        Backend(
            "engine-nchw",
            _engine_nchw,
            note="CAMEngine(channels_last=False): the trunk gets the images as plain does",
        ),
        Backend("engine-compile", _engine_compiled, note="CAMEngine(compile=True): compiled trunk"),
        Backend(
            "reference",
            _reference,
            methods=("gradcam", "cam"),
            note="hook-based, full backward (cam_engine.reference)",
        ),
        Backend("pytorch-grad-cam", _pytorch_grad_cam, methods=tuple(PGC_CLASSES)),
        Backend(
            "torchcam",
            _torchcam,
            methods=("gradcam", "cam"),
            note="+ postprocess.heatmaps for upsampling",
        ),
        Backend(
            "captum",
            _captum,
            methods=("gradcam",),
            note="LayerGradCam, + 1 forward for the top-1 class, + postprocess.heatmaps",
        ),
        Backend("ort-plain", _ort_plain, baseline=None),
        Backend(
            "ort-cam",
            _ort_cam,
            baseline="ort-plain",
            methods=("gradcam", "cam"),
            note="exported CAM model, ONNX Runtime",
        ),
        Backend("ov-plain", _ov_plain, baseline=None),
        Backend(
            "ov-cam",
            _ov_cam,
            baseline="ov-plain",
            methods=("gradcam", "cam"),
            note="exported CAM model, OpenVINO (CPU)",
        ),
        Backend(
            "ort-cam-top3",
            _ort_cam_top3,
            baseline="ort-plain",
            methods=("gradcam", "cam"),
            note="exported CAM model, 3 maps per image (the top-1 map is checked)",
        ),
        Backend(
            "ort-cam-int8",
            _ort_cam_int8,
            baseline="ort-plain",
            methods=("gradcam", "cam"),
            note="exported CAM model, int8 static quantisation (export.quantize)",
        ),
        Backend(
            "ort-cam-int8-dynamic",
            _ort_cam_int8_dynamic,
            baseline="ort-plain",
            methods=("gradcam", "cam"),
            note="exported CAM model, int8 dynamic quantisation (export.quantize)",
        ),
    )
}


def available() -> list[str]:
    """Backend names, in table order."""
    return list(BACKENDS)


def get(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the available ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def supports(backend: Backend, method: str) -> bool:
    """Whether ``backend`` implements ``method``."""
    return backend.methods is None or method in backend.methods
