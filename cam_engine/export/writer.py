"""``to_onnx``: write a model whose outputs are its logits, the explained classes and their maps.

The file is written next to its destination, checked, and only then moved into place
(:mod:`.atomic`): ``onnx.checker`` (full check), then ONNX Runtime on the CPU against the PyTorch
engine at a batch size other than the exported one and, with ``dynamic_size``, at a second input
size. A file that fails is not written, and the error says why; a previous file stays as it was.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__, postprocess
from ..engine import CAMEngine
from ..graph import module_dicts
from ..heads import gap_linear_message
from ..model import CAMModel
from .atomic import replacing, sidecar
from .decompositions import FoldedAttention
from .graphs import GapCAM, PoolMLPGradCAM, Postprocess, find_pool_mlp
from .head_vjp import HeadGradCAM
from .metadata import METADATA_KEY, SCHEMA_VERSION, CAMMetadata
from .options import ExportOptions

__all__ = ["to_onnx", "ExportResult", "optimize"]

_TOLERANCE = {False: 1e-4, True: 1e-2}  # fp16 -> max abs error of maps and relative of logits
#: logits and maps may differ from the float64 engine by this many times the error of the
#: PyTorch engine run at the model's precision, when that error is above the tolerance: the file
#: cannot round better than the arithmetic it runs in
_FLOOR_FACTOR = 4


@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote.

    Attributes:
        path: the ONNX file.
        metadata: what is stored under the ``"cam_engine"`` key of the file's metadata, as a
            dict (:meth:`CAMMetadata.to_dict`; the keys are documented in
            :mod:`cam_engine.export.metadata`).
        errors: max error of each self-check against the PyTorch engine (empty when skipped).
        optimized_path: the graph-optimised copy, when asked for.
    """

    path: Path
    metadata: dict
    errors: dict[str, float] = field(default_factory=dict)
    optimized_path: Path | None = None


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    target_layer: str | None = None,
    options: ExportOptions | None = None,
    **settings: Any,
) -> ExportResult:
    """Export ``model`` with its class-activation maps computed inside the graph.

    The ONNX model has one input ``x`` (B, 3, H, W) float32 (plus ``classes`` (B, K) int64 with
    ``classes_input``) and the outputs

    - ``logits`` (B, N) float32;
    - ``classes`` (B, K) int64: the top-``topk`` classes, best first (or the given ones);
    - ``heatmaps`` (B, K, H, W) float32 in [0, 1] (the engine's rule: bilinear upsampling with
      half-pixel centres, then per-map min-max), or with ``colormap`` ``overlay`` (B, K, 3, H, W)
      uint8: the colour map over the picture ``x * std + mean``, as :func:`cam_engine.overlay`.

    With ``upsample=False`` the maps stay at the feature map's (h, w); with ``normalize=False``
    they are the method's raw maps (the engine's ``cams``, upsampled if asked).

    Heads: global-average-pool -> linear (resnets, densenet, mobilenet v2, efficientnets,
    regnets...) for ``"cam"`` and ``"gradcam"``, one graph (the gradient is closed-form, no
    backward runs); pool -> flatten -> MLP heads (VGG, MobileNet v3, ConvNeXt: Linear, ReLU,
    Hardswish, SiLU, exact GELU, inactive Dropout, LayerNorm, and LayerNorm2d on a 1x1 pooled
    map) for ``"gradcam"``, with the MLP's backward written into the graph; any other head the
    engine splits for ``"gradcam"``, with the head's forward and backward traced as one graph
    (:mod:`cam_engine.export.head_vjp`; dynamo exporter only). An op without an ONNX form
    raises ``ValueError`` naming it.

    The file (and ``optimized_path``) is written in a hidden folder beside it, checked there, and
    moved into place only when everything succeeded: on any error the previous file is untouched.

    Args:
        model: a classifier in eval mode, or a :class:`cam_engine.CAMModel`.
        path: the ``.onnx`` file to write (one file; external data ``<name>.data`` only past
            2 GB).
        target_layer: as for :class:`cam_engine.CAMEngine`; ``None`` picks the default.
        options: the export settings (:class:`ExportOptions`); ``None``: the defaults.
        **settings: :class:`ExportOptions` fields by name (``method=``, ``topk=``,
            ``input_size=``, ...), replacing those of ``options``.

    Returns:
        :class:`ExportResult`. The same metadata is in the file under the ``"cam_engine"`` key.

    Raises:
        TypeError: ``options`` is not an :class:`ExportOptions`, or a setting is unknown.
        ValueError: unsupported head or method, bad settings, or a self-check above tolerance
            (1e-4, 1e-2 for fp16; for logits and heatmaps at least 4x the PyTorch engine's own
            error at the model's precision), in which case nothing is written.
    """
    opts = ExportOptions.merged(options, settings)
    path = Path(path)
    outputs = [path]
    if opts.optimized_path is not None:
        if opts.optimized_path.resolve() == path.resolve():
            raise ValueError(f"optimized_path must differ from the exported file {path}")
        outputs.append(opts.optimized_path)
    cam_model = _cam_model(model, target_layer, opts.output, opts.input_size)
    post = Postprocess(
        opts.upsample, opts.normalize, opts.colormap, opts.alpha, opts.mean, opts.std
    )
    exported = _converted_copy(cam_model, torch.float16) if opts.fp16 else cam_model
    features = _feature_like(cam_model, opts.input_size)
    channels = _input_channels(cam_model)
    batch = 2 if opts.dynamic_batch else opts.batch_size  # 2: no exporter specialises it
    example = _images(batch, channels, opts.input_size, cam_model)
    num_classes = _num_classes(cam_model, example)
    if opts.topk > num_classes:
        raise ValueError(f"topk={opts.topk} is larger than the number of classes ({num_classes})")
    graph, head = _graph(exported, opts, post, features, example)
    for folder in {p.parent for p in outputs}:
        folder.mkdir(parents=True, exist_ok=True)
    with replacing(*outputs) as staged:
        names = _export(graph, example, staged[0], opts, cam_model.split_kind)
        metadata = CAMMetadata(
            schema_version=SCHEMA_VERSION,
            version=__version__,
            method=opts.method,
            target_layer=cam_model.target_layer,
            head=head,
            exporter=names["exporter"],
            topk=opts.topk,
            num_classes=num_classes,
            input_size=opts.input_size,
            min_input_size=_min_input_size(opts.input_size, features),
            dynamic_batch=opts.dynamic_batch,
            dynamic_size=opts.dynamic_size,
            upsample=opts.upsample,
            normalize=opts.normalize,
            colormap=opts.colormap,
            alpha=opts.alpha,
            mean=opts.mean,
            std=opts.std,
            fp16=opts.fp16,
            inputs=names["inputs"],
            outputs=names["outputs"],
        )
        _finish(staged[0], metadata)
        result = ExportResult(path, metadata.to_dict())
        if opts.check:
            try:
                result.errors = _self_check(staged[0], cam_model, channels)
            except ValueError as exc:
                raise ValueError(f"{exc}; {path} was not written") from exc
        if opts.optimized_path is not None:
            _optimize(staged[0], staged[1], "extended")
            result.optimized_path = opts.optimized_path
    return result


def _min_input_size(input_size: tuple[int, int], features: Tensor) -> tuple[int, int]:
    """Input pixels per target-map cell at the export size, ``input // map`` per axis (at least
    1): the map's stride, measured. A smaller input has less than one cell of picture for the
    map; rounding down never refuses a size the map's stride allows."""
    pairs = zip(input_size, features.shape[-2:], strict=True)
    return tuple(max(1, size // cells) for size, cells in pairs)


def _cam_model(model, target_layer, output, input_size) -> CAMModel:
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    inner = model.model if isinstance(model, CAMModel) else model
    if inner.training:
        raise ValueError("the model is in training mode: call model.eval() before exporting")
    if isinstance(model, CAMModel):
        if target_layer is not None and target_layer != model.target_layer:
            raise ValueError(f"the wrapped model is split at {model.target_layer!r}")
        cam_model = model
    else:
        cam_model = CAMModel(  # the graphs take the trunk itself: no channels-last choice
            model, target_layer, output=output, input_size=tuple(input_size), channels_last=False
        )
    if cam_model.split_kind == "hook":
        raise ValueError(
            "the model could not be traced, so there is no graph to export ("
            + "; ".join(cam_model.notes)
            + ")"
        )
    return cam_model


def _converted_copy(cam_model: CAMModel, *to_args) -> CAMModel:
    """A copy moved by ``nn.Module.to(*to_args)``, split at the same layer (the caller's model
    is left as it is), without what the modules memoised (:func:`_without_memos`)."""
    moved = copy.deepcopy(cam_model.model, _without_memos(cam_model.model)).to(*to_args)
    return CAMModel(
        moved,
        cam_model.target_layer,
        output=cam_model.output,
        input_size=cam_model.input_size,
        channels_last=False,
    )


def _without_memos(model: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo under which each module's own dicts
    (:func:`cam_engine.graph.module_dicts`) are copied without their tensors.

    A tensor in a module's plain dict (timm LeViT / EfficientFormer's and Hugging Face LeViT's
    ``attention_bias_cache``) is a value the module memoised from its parameters: ``.to()`` does
    not convert it, and one memoised while autograd was on is no graph leaf, which ``deepcopy``
    refuses. The copy computes it again from its own weights when it needs it.
    """
    memo: dict[int, Any] = {}
    for table in module_dicts(model):
        kept = {key: value for key, value in table.items() if not isinstance(value, Tensor)}
        memo[id(table)] = copy.deepcopy(kept, memo)
    return memo


def _graph(
    cam_model: CAMModel, opts: ExportOptions, post: Postprocess, features: Tensor, example: Tensor
):
    """The exportable module and the name of the head's kind (``features``: a target map at
    the export size; ``example``: the images the export traces with)."""
    built = cam_model.current()
    gap = built.gap
    method, topk = opts.method, opts.topk
    if gap is not None and gap.applies(features):
        return GapCAM(cam_model, method, topk, post).eval(), "gap-linear"
    if method == "cam":
        head_graph = None if built.split is None else built.split.head
        raise ValueError(gap_linear_message(head_graph, cam_model.target_layer, method))
    try:
        head = find_pool_mlp(built.split.head)
    except ValueError:
        head = None
    if head is not None and cam_model.output is None:
        return PoolMLPGradCAM(cam_model, head, topk, post).eval(), "pool-mlp"
    if opts.exporter == "torchscript":
        raise ValueError(
            f"the head after {cam_model.target_layer!r} is neither global-average-pool -> "
            "linear nor pool -> flatten -> MLP: its traced gradient exports with "
            "exporter='dynamo' (or 'auto') only"
        )
    try:
        graph = HeadGradCAM(cam_model, topk, post, example, opts.classes_input, opts.dynamic_size)
    except ValueError as exc:
        raise ValueError(
            f"cannot export Grad-CAM for the head after {cam_model.target_layer!r}: {exc}"
        ) from None
    return graph.eval(), "head-vjp"


def _feature_like(cam_model: CAMModel, size: tuple[int, int]) -> Tensor:
    """The target map (1, C, h, w) of a random image of ``size``."""
    x = _images(1, _input_channels(cam_model), size, cam_model)
    with torch.no_grad():
        return cam_model(_in_model_dtype(cam_model, x))[1]


def _num_classes(cam_model: CAMModel, example: Tensor) -> int:
    with torch.no_grad():
        return int(cam_model(_in_model_dtype(cam_model, example[:1]))[0].shape[1])


def _in_model_dtype(cam_model: CAMModel, x: Tensor) -> Tensor:
    return x.to(next(cam_model.model.parameters()).dtype)


def _input_channels(cam_model: CAMModel) -> int:
    conv = next((m for m in cam_model.model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _images(batch: int, channels: int, size, cam_model: CAMModel, seed: int = 0) -> Tensor:
    """Reproducible float32 images on the model's device."""
    param = next(cam_model.model.parameters())
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=generator)
    return x.to(param.device)


def _export(graph, example: Tensor, path: Path, opts: ExportOptions, split_kind: str) -> dict:
    """Run the exporter; returns the input and output names with their shapes (tuples).
    ``split_kind`` is the model's (:attr:`CAMModel.split_kind`)."""
    batch = "batch" if opts.dynamic_batch else example.shape[0]
    height, width = ("height", "width") if opts.dynamic_size else tuple(example.shape[2:])
    k = "k" if opts.classes_input else opts.topk
    maps = (height, width) if opts.upsample else ("map_height", "map_width")
    inputs = {"x": (batch, example.shape[1], height, width)}
    args = (example,)
    if opts.classes_input:
        inputs["classes"] = (batch, k)
        args = (
            example,
            torch.zeros(example.shape[0], opts.topk, dtype=torch.long, device=example.device),
        )
    name = "overlay" if graph.post.lut is not None else "heatmaps"
    outputs = {"logits": (batch, "num_classes"), "classes": (batch, k)}
    if opts.classes_input:
        del outputs["classes"]  # the caller's own input; ONNX names must differ
    outputs[name] = (batch, k, 3, *maps) if name == "overlay" else (batch, k, *maps)
    exporter = opts.exporter
    # ATen graphs go to the dynamo exporter: a traced gradient, and a torch.export split, whose
    # sizes (``sym_size`` calls) the TorchScript tracer would record as constants (the batch
    # fixed in a reshape). Such a split is exported per input size, so dynamo would also fix H
    # and W: with dynamic_size it stays on TorchScript, whose file holds at other sizes wherever
    # no size is in a reshape (the self-check at a second size says whether it does)
    aten_graph = isinstance(graph, HeadGradCAM) or (
        split_kind == "export" and not opts.dynamic_size
    )
    use_dynamo = exporter == "dynamo" or (
        exporter == "auto" and (aten_graph or not _has_torchscript())
    )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer notes
        if use_dynamo:
            _export_dynamo(graph, args, path, inputs, outputs, opts.opset)
        else:
            _export_torchscript(graph, args, path, inputs, outputs, opts.opset)
    return {
        "inputs": inputs,
        "outputs": outputs,
        "exporter": "dynamo" if use_dynamo else "torchscript",
    }


def _has_torchscript() -> bool:
    return hasattr(torch.onnx, "utils") and hasattr(torch.jit, "trace")


def _symbolic(shapes: dict[str, list]) -> dict[str, dict[int, str]]:
    return {
        name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
        for name, shape in shapes.items()
    }


def _export_torchscript(graph, args, path, inputs, outputs, opset) -> None:
    torch.onnx.export(
        graph,
        args,
        str(path),
        dynamo=False,
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes={**_symbolic(inputs), **_symbolic(outputs)},
        opset_version=opset or 17,
        do_constant_folding=True,
    )


def _export_dynamo(graph, args, path, inputs, outputs, opset) -> None:
    dims = {}
    shapes = tuple(
        {i: dims.setdefault(d, torch.export.Dim(d)) for i, d in axes.items()}
        for axes in _symbolic(inputs).values()
    )
    try:
        with FoldedAttention():  # attention over several batch dimensions as 4-D attention
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=True,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_shapes=shapes,
                opset_version=opset or 18,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        found = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", str(exc))
        if found is None:
            raise
        raise ValueError(
            f"the model uses {found.group(1)}, which has no ONNX form in torch.onnx"
        ) from None


def _finish(path: Path, metadata: CAMMetadata) -> None:
    """Metadata in, one file out (external data only past protobuf's 2 GB), full checker."""
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
    proto.doc_string = (
        f"cam-engine {metadata.method} at {metadata.target_layer!r}: outputs "
        + ", ".join(f"{n} {s}" for n, s in metadata.outputs.items())
    )
    large = proto.ByteSize() > 2**31 - 2**20
    onnx.save(proto, str(path), save_as_external_data=large, location=sidecar(path).name)
    onnx.checker.check_model(str(path), full_check=True)


def optimize(path: str | os.PathLike, out: str | os.PathLike, level: str = "extended") -> Path:
    """Save ONNX Runtime's graph-optimised version of ``path`` to ``out``.

    ``"extended"`` keeps the file portable across execution providers; ``"all"`` adds
    CPU-specific layouts (NCHWc) that only the CPU provider runs. ``out`` is written beside
    itself and moved into place when complete: on an error a previous ``out`` stays as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as (staged,):
        _optimize(Path(path), staged, level)
    return out


def _optimize(path: Path, out: Path, level: str) -> None:
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"unknown optimisation level {level!r}; available: {', '.join(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# Self-check -------------------------------------------------------------------------------------


def _check_sizes(metadata: CAMMetadata) -> list[tuple[int, tuple[int, int]]]:
    """(batch, (H, W)) to run: another batch size, and another non-square size if dynamic
    (not below the file's minimum size)."""
    batch = 3 if metadata.dynamic_batch else metadata.inputs["x"][0]
    height, width = metadata.input_size
    cases = [(batch, (height, width))]
    if metadata.dynamic_size:
        low_h, low_w = metadata.min_input_size
        other = (max(low_h, height + height // 4 + 8), max(low_w, width - width // 4 + 8))
        cases.append((batch, other))
    return cases


def _self_check(path: Path, cam_model: CAMModel, channels: int) -> dict[str, float]:
    """Max errors of the file on ORT CPU vs the engine; ``ValueError`` above tolerance.

    The file's metadata is read back as every reader reads it (:meth:`CAMMetadata.from_session`).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = CAMMetadata.from_session(session, "the exported file")
    # The reference runs in float64: a float32 one has rounding errors of its own as large as
    # the file's on deep random-init networks (resnet50: 1.1e-4 vs 6.8e-5 on the maps).
    reference = _converted_copy(cam_model, "cpu", torch.float64)
    engine = CAMEngine(reference, method=metadata.method)
    tol = _TOLERANCE[metadata.fp16]
    errors: dict[str, float] = {}
    for seed, (batch, size) in enumerate(_check_sizes(metadata), start=1):
        x = _images(batch, channels, size, reference, seed=seed)
        feed = {"x": x.cpu().numpy()}
        if "classes" in metadata.inputs:
            generator = torch.Generator().manual_seed(seed)
            classes = torch.randint(
                metadata.num_classes, (batch, metadata.topk), generator=generator
            )
            feed["classes"] = classes.numpy()
        where = f"batch {batch}, size {size[0]}x{size[1]}"
        try:
            got = dict(zip(metadata.outputs, session.run(None, feed), strict=True))
            got = {name: torch.from_numpy(value) for name, value in got.items()}
            if "classes" in feed:
                got["classes"] = classes
            measured = compare(got, engine, x, metadata)
        except Exception as exc:  # a shape the model or the file cannot take
            raise ValueError(
                f"the exported model could not be checked at {where}: {type(exc).__name__}: "
                f"{exc}"
            ) from exc
        own: dict[str, float] = {}
        for name, error in measured.items():
            errors[f"{name} ({where})"] = error
            limit, floor = (1 if name == "overlay" else tol), ""
            if name in ("logits", "heatmaps") and error > limit:
                own = own or _engine_errors(cam_model, engine, x, got["classes"], metadata)
                limit = max(limit, _FLOOR_FACTOR * own[name])
                floor = (
                    f" ({_FLOOR_FACTOR}x the model-precision engine's own error, {own[name]:.3g})"
                )
            if error > limit:
                raise ValueError(
                    f"the exported model differs from the PyTorch engine at {where}: {name} "
                    f"error {error:.3g} > {limit:.3g}{floor}"
                    + (" (a dynamic axis that the exporter baked in?)" if seed > 1 else "")
                    + (" (float16 rounding; check=False accepts it)" if metadata.fp16 else "")
                )
    return errors


def _engine_errors(
    cam_model: CAMModel, reference: CAMEngine, x: Tensor, classes: Tensor, metadata: CAMMetadata
) -> dict[str, float]:
    """The logits and heatmaps errors (:func:`compare`) of the PyTorch engine itself at the
    model's own precision: the floor that float32 rounding of large activations (or of logits
    that cancel) sets for the file too."""
    device = next(cam_model.model.parameters()).device
    own = CAMEngine(cam_model, method=metadata.method)(
        _in_model_dtype(cam_model, x.to(device)), classes.to(device)
    )
    maps = own.cams.double()
    if metadata.upsample:
        maps = postprocess.upsample(maps, tuple(x.shape[2:]))
    if metadata.normalize:
        maps = postprocess.normalize(maps)
    got = {"logits": own.logits.double().cpu(), "classes": classes, "heatmaps": maps.cpu()}
    return compare(got, reference, x, metadata)


def compare(
    got: dict[str, Tensor], engine: CAMEngine, x: Tensor, metadata: CAMMetadata
) -> dict[str, float]:
    """Errors of an exported model's outputs ``got`` (CPU tensors) against ``engine`` on ``x``.

    Returns relative logits error, the top-k score gap of the file's classes (relative), the
    maps' error (:func:`map_error`), or for overlays the largest difference in colour-table
    steps (after removing the blend's own rounding).
    """
    classes = got["classes"]
    ref = engine(_in_model_dtype(engine.cam_model, x), classes.to(x.device))
    logits = ref.logits.double().cpu()
    scale = logits.abs().max().clamp_min(1.0)
    errors = {"logits": float((got["logits"] - logits).abs().max() / scale)}
    if "classes" not in metadata.inputs:
        best = logits.topk(metadata.topk, dim=1).values
        errors["classes"] = float((logits.gather(1, classes) - best).abs().max() / scale)
    size = tuple(x.shape[2:])
    if "overlay" in got:
        mean = torch.tensor(metadata.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(metadata.std, device=x.device).view(1, 3, 1, 1)
        want = postprocess.overlay(
            x.float() * std + mean, ref.heatmaps.float(), metadata.colormap, metadata.alpha
        ).cpu()
        errors["overlay"] = _overlay_steps(got["overlay"], want, metadata)
        return errors
    raw = ref.cams.double()
    if metadata.upsample:
        raw = postprocess.upsample(raw, size)
    errors["heatmaps"] = float(map_error(got["heatmaps"].double(), raw.cpu(), metadata.normalize))
    return errors


def map_error(got: Tensor, raw: Tensor, normalized: bool) -> Tensor:
    """Max error of maps ``got`` against the reference's raw maps (B, K, H, W), relative.

    Raw maps: relative to each map's max. Min-max normalised maps: the error times each map's
    ``(max - min) / max``: normalising divides by the span, so a nearly flat map magnifies the
    float32 noise of both sides by ``max / span``; this measures what the export controls.
    """
    flat = raw.flatten(2)
    top = flat.abs().amax(-1).clamp_min(1e-30)[..., None, None]
    if not normalized:
        return ((got - raw) / top).abs().max()
    span = (flat.amax(-1) - flat.amin(-1))[..., None, None]
    return ((got - postprocess.normalize(raw)) * span / top).abs().max()


def _overlay_steps(got: Tensor, want: Tensor, metadata: CAMMetadata) -> float:
    """Overlay difference in colour-table steps: a map value within 5e-7 of a rounding
    boundary may pick the neighbouring entry, so one step (plus the blend's rounding) is fine."""
    lut = postprocess.colormap_lut(metadata.colormap).float()
    step = (lut[1:] - lut[:-1]).abs().max() * metadata.alpha
    diff = (got.float() - want.float()).abs().max()
    return float((diff - 1).clamp_min(0) / step.clamp_min(1))
