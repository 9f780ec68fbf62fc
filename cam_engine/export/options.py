"""``ExportOptions``: every setting of :func:`cam_engine.export.to_onnx`, validated in one place."""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model import OutputSelector
from .graphs import Postprocess
from .metadata import METHODS

__all__ = ["ExportOptions", "IMAGENET_MEAN", "IMAGENET_STD", "EXPORTERS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``exporter=`` values; ``"auto"`` is TorchScript while torch has it (not for a traced head
#: gradient, nor a ``torch.export`` split at one input size), else dynamo
EXPORTERS = ("auto", "torchscript", "dynamo")


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`cam_engine.export.to_onnx` builds and checks the file.

    Invalid values raise ``ValueError`` when the options are made (``to_onnx(**settings)`` makes
    them too), before any model is traced. Sequences are stored as tuples, ``optimized_path`` as
    a ``Path``.

    Attributes:
        method: ``"cam"`` or ``"gradcam"``.
        topk: classes explained per image (a constant of the graph), >= 1.
        input_size: (H, W) of the example input; the only size unless ``dynamic_size``.
        dynamic_batch: any batch size (else ``batch_size``).
        dynamic_size: any input size from the file's ``min_input_size`` up; checked at a second
            size before returning.
        upsample: heatmaps at the input's (H, W) (else the feature map's (h, w)).
        normalize: per-map min-max to [0, 1] (else the method's raw maps).
        colormap: output uint8 overlays in this colour map (needs ``upsample`` and
            ``normalize``; ``postprocess.available_colormaps()``).
        opset: ONNX opset (default 17 with the TorchScript exporter, 18 with dynamo).
        fp16: trunk and head in float16 (for GPU runtimes); top-k, maps and min-max stay float32;
            inputs and outputs keep their types.
        classes_input: add a ``classes`` (B, K) input: explain those classes instead of top-k.
        alpha: overlay colour weight in [0, 1].
        mean, std: the per-channel normalisation the model's inputs had (``std`` > 0), to recover
            the picture for overlays; stored for runners that preprocess images.
        output: where the logits are in the model's output (global-average-pool heads and
            traced head gradients).
        batch_size: the batch size when ``dynamic_batch`` is off, >= 1.
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``), ``"dynamo"``, or
            ``"auto"``: TorchScript while torch has it (several times faster to export here),
            else dynamo; dynamo for a traced head gradient (``head-vjp``) and, without
            ``dynamic_size``, for a model split by ``torch.export`` (its sizes are ATen
            ``sym_size`` calls, which the TorchScript tracer would record as constants: a batch
            size fixed in a reshape).
        check: run the self-check (on by default; it costs a few engine and ORT calls).
        optimized_path: also save an ORT graph-optimised copy there (portable: extended level).
    """

    method: str = "cam"
    topk: int = 1
    input_size: tuple[int, int] = (224, 224)
    dynamic_batch: bool = True
    dynamic_size: bool = False
    upsample: bool = True
    normalize: bool = True
    colormap: str | None = None
    opset: int | None = None
    fp16: bool = False
    classes_input: bool = False
    alpha: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    output: OutputSelector = None
    batch_size: int = 1
    exporter: str = "auto"
    check: bool = True
    optimized_path: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"export supports methods {', '.join(METHODS)}; got {self.method!r}")
        _positive_int("topk", self.topk)
        _positive_int("batch_size", self.batch_size)
        if self.opset is not None:
            _positive_int("opset", self.opset)
        size = _numbers("input_size", self.input_size, 2, int)
        if min(size) < 1:
            raise ValueError(f"input_size must be (H, W) of positive ints, got {self.input_size!r}")
        mean = _numbers("mean", self.mean, 3, float)
        std = _numbers("std", self.std, 3, float)
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        for name in ("dynamic_batch", "dynamic_size", "upsample", "normalize", "fp16",
                     "classes_input", "check"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(
                f"unknown exporter {self.exporter!r}; available: {', '.join(EXPORTERS)}"
            )
        Postprocess.check_arguments(self.upsample, self.normalize, self.colormap, self.alpha)
        # normalised in place: a frozen dataclass sets its own fields through object.__setattr__
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.optimized_path is not None:
            object.__setattr__(self, "optimized_path", Path(os.fspath(self.optimized_path)))

    @classmethod
    def merged(cls, options: ExportOptions | None, settings: dict[str, Any]) -> ExportOptions:
        """``options`` (default: all defaults) with the keyword ``settings`` replacing fields.

        Raises:
            TypeError: ``options`` is not an ``ExportOptions``, or a setting is not a field.
            ValueError: a value is invalid.
        """
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise TypeError(
                f"options must be an ExportOptions, got {type(options).__name__} {options!r}; "
                "pass method= and the other settings by keyword"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(
                f"unknown export setting(s) {', '.join(unknown)}; "
                f"ExportOptions has {', '.join(sorted(names))}"
            )
        return dataclasses.replace(options, **settings) if settings else options


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _numbers(name: str, value: Any, length: int, kind: type) -> tuple:
    """``value`` as a tuple of ``length`` numbers of ``kind`` (ints for int, any real for float)."""
    ok_types = numbers.Integral if kind is int else numbers.Real
    items = tuple(value) if isinstance(value, tuple | list) else None
    if (
        items is None
        or len(items) != length
        or any(not isinstance(v, ok_types) or isinstance(v, bool) for v in items)
    ):
        raise ValueError(f"{name} must be {length} {kind.__name__}s, got {value!r}")
    return tuple(kind(v) for v in items)
