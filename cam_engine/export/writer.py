"""``to_onnx``: write a model whose outputs are its logits, the explained classes and their maps.

The file is checked before it is returned: ``onnx.checker`` (full check), then ONNX Runtime on
the CPU against the PyTorch engine at a batch size other than the exported one and, with
``dynamic_size``, at a second input size. A file that fails is deleted and the error says why.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import __version__, postprocess
from ..engine import CAMEngine
from ..model import CAMModel, OutputSelector
from .graphs import GapCAM, PoolMLPGradCAM, Postprocess, find_pool_mlp

__all__ = ["to_onnx", "ExportResult", "IMAGENET_MEAN", "IMAGENET_STD", "optimize", "METADATA_KEY"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METADATA_KEY = "cam_engine"
_METHODS = ("cam", "gradcam")
_EXPORTERS = ("auto", "torchscript", "dynamo")
_TOLERANCE = {False: 1e-4, True: 1e-2}  # fp16 -> max abs error of maps and relative of logits


@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote.

    Attributes:
        path: the ONNX file.
        metadata: what is stored under the ``"cam_engine"`` key of the file's metadata (inputs,
            outputs with their shapes, method, target layer, top-k, head kind, ...).
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
    method: str = "cam",
    topk: int = 1,
    input_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    upsample: bool = True,
    normalize: bool = True,
    colormap: str | None = None,
    opset: int | None = None,
    fp16: bool = False,
    *,
    classes_input: bool = False,
    alpha: float = 0.5,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    output: OutputSelector = None,
    batch_size: int = 1,
    exporter: str = "auto",
    check: bool = True,
    optimized_path: str | os.PathLike | None = None,
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
    map) for ``"gradcam"``, with the MLP's backward written into the graph. Anything else raises
    ``ValueError`` naming the op that is not supported.

    Args:
        model: a classifier in eval mode, or a :class:`cam_engine.CAMModel`.
        path: the ``.onnx`` file to write (one file; external data only past 2 GB).
        target_layer: as for :class:`cam_engine.CAMEngine`; ``None`` picks the default.
        method: ``"cam"`` or ``"gradcam"``.
        topk: classes explained per image (a constant of the graph).
        input_size: (H, W) of the example input; the fixed size unless ``dynamic_size``.
        dynamic_batch: any batch size (else ``batch_size``).
        dynamic_size: any input size; checked at a second size before returning.
        upsample, normalize: see above.
        colormap: output overlays in this colour map (``postprocess.available_colormaps()``).
        opset: ONNX opset (default 17 with the TorchScript exporter, 18 with dynamo).
        fp16: trunk and head in float16 (for GPU runtimes); top-k, maps and min-max stay float32;
            inputs and outputs keep their types.
        classes_input: add a ``classes`` (B, K) input: explain those classes instead of top-k.
        alpha: overlay colour weight.
        mean, std: the normalisation the model's inputs had, to recover the picture for overlays.
        output: where the logits are in the model's output (global-average-pool heads only).
        batch_size: the batch size when ``dynamic_batch`` is off.
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``), ``"dynamo"``, or
            ``"auto"``: TorchScript while torch has it (several times faster to export here),
            else dynamo.
        check: run the self-check (on by default; it costs a few engine and ORT calls).
        optimized_path: also save an ORT graph-optimised copy there (portable: extended level).

    Returns:
        :class:`ExportResult`. The same metadata is in the file under the ``"cam_engine"`` key.

    Raises:
        ValueError: unsupported head or method, bad arguments, or a self-check above tolerance
            (1e-4, 1e-2 for fp16), in which case the file is deleted.
    """
    _check_arguments(method, topk, input_size, exporter, batch_size, colormap)
    cam_model = _cam_model(model, target_layer, output, input_size)
    post = Postprocess(upsample, normalize, colormap, alpha, mean, std)
    exported = _converted_copy(cam_model, torch.float16) if fp16 else cam_model
    graph, head = _graph(exported, method, topk, post)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = _input_channels(cam_model)
    batch = 2 if dynamic_batch else batch_size  # 2: neither the 1 nor the 3 exporters specialise
    example = _images(batch, channels, input_size, cam_model)
    num_classes = _num_classes(cam_model, example)
    if topk > num_classes:
        raise ValueError(f"topk={topk} is larger than the number of classes ({num_classes})")
    names = _export(
        graph,
        example,
        path,
        topk,
        classes_input,
        dynamic_batch,
        dynamic_size,
        opset,
        exporter,
        upsample,
    )
    metadata = {
        "version": __version__,
        "method": method,
        "target_layer": cam_model.target_layer,
        "head": head,
        "topk": topk,
        "num_classes": num_classes,
        "input_size": list(input_size),
        "dynamic_batch": dynamic_batch,
        "dynamic_size": dynamic_size,
        "upsample": upsample,
        "normalize": normalize,
        "colormap": colormap,
        "alpha": alpha,
        "mean": list(mean),
        "std": list(std),
        "fp16": fp16,
        **names,
    }
    _finish(path, metadata)
    result = ExportResult(path, metadata)
    if check:
        try:
            result.errors = _self_check(path, cam_model, metadata, channels)
        except Exception:
            path.unlink(missing_ok=True)
            raise
    if optimized_path is not None:
        result.optimized_path = optimize(path, optimized_path)
    return result


def _check_arguments(method, topk, input_size, exporter, batch_size, colormap) -> None:
    if method not in _METHODS:
        raise ValueError(f"export supports methods {', '.join(_METHODS)}; got {method!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if len(tuple(input_size)) != 2 or min(input_size) < 1:
        raise ValueError(f"input_size must be (H, W), got {input_size!r}")
    if exporter not in _EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; available: {', '.join(_EXPORTERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if colormap is not None:
        postprocess.colormap_lut(colormap)  # unknown names list the available ones


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
    is left as it is)."""
    moved = copy.deepcopy(cam_model.model).to(*to_args)
    return CAMModel(
        moved,
        cam_model.target_layer,
        output=cam_model.output,
        input_size=cam_model.input_size,
        channels_last=False,
    )


def _graph(cam_model: CAMModel, method: str, topk: int, post: Postprocess):
    """The exportable module and the name of the head's kind."""
    built = cam_model.current()
    gap = built.gap
    if gap is not None and gap.applies(_feature_like(cam_model)):
        return GapCAM(cam_model, method, topk, post).eval(), "gap-linear"
    if method == "cam":
        raise ValueError(
            f"method 'cam' needs a head that is global average pooling -> (flatten / dropout) "
            f"-> linear after {cam_model.target_layer!r}, and this model's is not; "
            "use method='gradcam'"
        )
    try:
        head = find_pool_mlp(built.split.head)
    except ValueError as exc:
        raise ValueError(
            f"cannot export Grad-CAM for the head after {cam_model.target_layer!r}: it is "
            f"neither global-average-pool -> linear nor pool -> flatten -> MLP: {exc}"
        ) from None
    if cam_model.output is not None:
        raise ValueError("output= selectors are supported for global-average-pool heads only")
    return PoolMLPGradCAM(cam_model, head, topk, post).eval(), "pool-mlp"


def _feature_like(cam_model: CAMModel) -> Tensor:
    x = _images(1, _input_channels(cam_model), cam_model.input_size, cam_model)
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


def _export(
    graph,
    example,
    path,
    topk,
    classes_input,
    dynamic_batch,
    dynamic_size,
    opset,
    exporter,
    upsample,
) -> dict:
    """Run the exporter; returns the input and output names with their shapes."""
    batch = "batch" if dynamic_batch else example.shape[0]
    height, width = ("height", "width") if dynamic_size else tuple(example.shape[2:])
    k = "k" if classes_input else topk
    maps = [height, width] if upsample else ["map_height", "map_width"]
    inputs = {"x": [batch, example.shape[1], height, width]}
    args = (example,)
    if classes_input:
        inputs["classes"] = [batch, k]
        args = (
            example,
            torch.zeros(example.shape[0], topk, dtype=torch.long, device=example.device),
        )
    name = "overlay" if graph.post.lut is not None else "heatmaps"
    outputs = {"logits": [batch, "num_classes"], "classes": [batch, k]}
    if classes_input:
        del outputs["classes"]  # the caller's own input; ONNX names must differ
    outputs[name] = [batch, k, 3, *maps] if name == "overlay" else [batch, k, *maps]
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and not _has_torchscript())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer notes
        if use_dynamo:
            _export_dynamo(graph, args, path, inputs, outputs, opset)
        else:
            _export_torchscript(graph, args, path, inputs, outputs, opset)
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


def _finish(path: Path, metadata: dict) -> None:
    """Metadata in, one file out (external data only past protobuf's 2 GB), full checker."""
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.doc_string = (
        f"cam-engine {metadata['method']} at {metadata['target_layer']!r}: outputs "
        + ", ".join(f"{n} {tuple(s)}" for n, s in metadata["outputs"].items())
    )
    large = proto.ByteSize() > 2**31 - 2**20
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    onnx.save(proto, str(path), save_as_external_data=large, location=path.name + ".data")
    onnx.checker.check_model(str(path), full_check=True)


def optimize(path: str | os.PathLike, out: str | os.PathLike, level: str = "extended") -> Path:
    """Save ONNX Runtime's graph-optimised version of ``path`` to ``out``.

    ``"extended"`` keeps the file portable across execution providers; ``"all"`` adds
    CPU-specific layouts (NCHWc) that only the CPU provider runs.
    """
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
    return Path(out)


# Self-check -------------------------------------------------------------------------------------


def _check_sizes(metadata: dict) -> list[tuple[int, tuple[int, int]]]:
    """(batch, (H, W)) to run: another batch size, and another non-square size if dynamic."""
    batch = 3 if metadata["dynamic_batch"] else metadata["inputs"]["x"][0]
    height, width = metadata["input_size"]
    cases = [(batch, (height, width))]
    if metadata["dynamic_size"]:
        cases.append((batch, (height + height // 4 + 8, width - width // 4 + 8)))
    return cases


def _self_check(path: Path, cam_model: CAMModel, metadata: dict, channels: int) -> dict:
    """Max errors of the file on ORT CPU vs the engine; ``ValueError`` above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # The reference runs in float64: a float32 one has rounding errors of its own as large as
    # the file's on deep random-init networks (resnet50: 1.1e-4 vs 6.8e-5 on the maps).
    reference = _converted_copy(cam_model, "cpu", torch.float64)
    engine = CAMEngine(reference, method=metadata["method"])
    tol = _TOLERANCE[metadata["fp16"]]
    errors: dict[str, float] = {}
    for seed, (batch, size) in enumerate(_check_sizes(metadata), start=1):
        x = _images(batch, channels, size, reference, seed=seed)
        feed = {"x": x.cpu().numpy()}
        if "classes" in metadata["inputs"]:
            generator = torch.Generator().manual_seed(seed)
            classes = torch.randint(
                metadata["num_classes"], (batch, metadata["topk"]), generator=generator
            )
            feed["classes"] = classes.numpy()
        where = f"batch {batch}, size {size[0]}x{size[1]}"
        try:
            got = dict(zip(metadata["outputs"], session.run(None, feed), strict=True))
            got = {name: torch.from_numpy(value) for name, value in got.items()}
            if "classes" in feed:
                got["classes"] = classes
            measured = compare(got, engine, x, metadata)
        except Exception as exc:  # a shape the model or the file cannot take
            raise ValueError(
                f"the exported model could not be checked at {where}: {type(exc).__name__}: "
                f"{exc}; {path} was deleted"
            ) from exc
        for name, error in measured.items():
            errors[f"{name} ({where})"] = error
            limit = 1 if name == "overlay" else tol
            if error > limit:
                raise ValueError(
                    f"the exported model differs from the PyTorch engine at {where}: {name} "
                    f"error {error:.3g} > {limit:g}"
                    + (" (a dynamic axis that the exporter baked in?)" if seed > 1 else "")
                    + (" (float16 rounding; check=False accepts it)" if metadata["fp16"] else "")
                    + f"; {path} was deleted"
                )
    return errors


def compare(got: dict[str, Tensor], engine: CAMEngine, x: Tensor, metadata: dict) -> dict:
    """Errors of an exported model's outputs ``got`` (CPU tensors) against ``engine`` on ``x``.

    Returns relative logits error, the top-k score gap of the file's classes (relative), the
    maps' error (:func:`map_error`), or for overlays the largest difference in colour-table
    steps (after removing the blend's own rounding).
    """
    classes = got["classes"]
    ref = engine(_in_model_dtype(engine.model, x), classes.to(x.device))
    logits = ref.logits.double().cpu()
    scale = logits.abs().max().clamp_min(1.0)
    errors = {"logits": float((got["logits"] - logits).abs().max() / scale)}
    if "classes" not in metadata["inputs"]:
        best = logits.topk(metadata["topk"], dim=1).values
        errors["classes"] = float((logits.gather(1, classes) - best).abs().max() / scale)
    size = tuple(x.shape[2:])
    if "overlay" in got:
        mean = torch.tensor(metadata["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(metadata["std"], device=x.device).view(1, 3, 1, 1)
        want = postprocess.overlay(
            x.float() * std + mean, ref.heatmaps.float(), metadata["colormap"], metadata["alpha"]
        ).cpu()
        errors["overlay"] = _overlay_steps(got["overlay"], want, metadata)
        return errors
    raw = ref.cams.double()
    if metadata["upsample"]:
        raw = postprocess.upsample(raw, size)
    errors["heatmaps"] = float(
        map_error(got["heatmaps"].double(), raw.cpu(), metadata["normalize"])
    )
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


def _overlay_steps(got: Tensor, want: Tensor, metadata: dict) -> float:
    """Overlay difference in colour-table steps: a map value within 5e-7 of a rounding
    boundary may pick the neighbouring entry, so one step (plus the blend's rounding) is fine."""
    lut = postprocess.colormap_lut(metadata["colormap"]).float()
    step = (lut[1:] - lut[:-1]).abs().max() * metadata["alpha"]
    diff = (got.float() - want.float()).abs().max()
    return float((diff - 1).clamp_min(0) / step.clamp_min(1))
