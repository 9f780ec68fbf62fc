"""The export's metadata: one JSON object in the ONNX file, read and written only through here.

:func:`~cam_engine.export.to_onnx` stores it as the ``metadata_props`` entry ``"cam_engine"``;
:class:`~cam_engine.export.OrtCAM` and the export's self-check read it with
:meth:`CAMMetadata.from_session`. Schema version 1, every key required, no other key allowed:

==================  ===================  ===========================================================
key                 JSON type            meaning
==================  ===================  ===========================================================
``schema_version``  int                  1; readers refuse a newer version
``version``         string               the cam-engine version that wrote the file
``method``          string               ``"cam"`` or ``"gradcam"``
``target_layer``    string               the module the maps are taken at
``head``            string               how the maps are built: ``"gap-linear"``,
                                         ``"pool-mlp"`` or ``"head-vjp"`` (traced gradient)
``exporter``        string               ``"torchscript"`` or ``"dynamo"``
``topk``            int >= 1             classes explained per image without a classes input
``num_classes``     int >= 1             N, the width of the logits
``input_size``      [int, int]           (H, W) of the export; the only size unless dynamic_size
``min_input_size``  [int, int]           the smallest (H, W) accepted: input pixels per
                                         target-map cell at export, ``input // map`` (the map's
                                         stride; below it the map has less than one cell of
                                         picture, and maps come out flat)
``dynamic_batch``   bool                 any batch size (else ``inputs.x[0]``)
``dynamic_size``    bool                 any (H, W) >= ``min_input_size`` (else ``input_size``)
``upsample``        bool                 maps at the input's (H, W), else at the target map's
``normalize``       bool                 per-map min-max to [0, 1], else the raw maps
``colormap``        string or null       colour map of the ``overlay`` output, null: ``heatmaps``
``alpha``           number in [0, 1]     overlay colour weight
``mean``, ``std``   [number x 3]         the inputs' normalisation: picture = x * std + mean
``fp16``            bool                 float16 trunk and head inside the graph (a traced
                                         head gradient, ``"head-vjp"``, runs in float32)
``inputs``          {name: shape}        ``x`` (B, C, H, W), and ``classes`` (B, K) with a
                                         classes input
``outputs``         {name: shape}        ``logits`` (B, N); ``classes`` (B, K) unless it is an
                                         input; ``heatmaps`` (B, K, H, W) or ``overlay``
                                         (B, K, 3, H, W), in the file's output order
==================  ===================  ===========================================================

A shape is a list of ints (fixed axes) and strings (named dynamic axes: ``batch``, ``height``,
``width``, ``k``, ``num_classes``, ``map_height``, ``map_width``).

The C++ runner ``cam-ort`` (export/cam_ort/main.cpp) reads ``inputs.x`` (a fixed batch when its
first entry is an int; the channel count), whether ``inputs`` has ``classes``, ``input_size``,
``dynamic_size``, ``normalize``, ``topk``, ``alpha``, ``mean`` and ``std``; it ignores the other
keys and does not check ``schema_version``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CAMMetadata", "METADATA_KEY", "SCHEMA_VERSION", "METHODS", "HEADS"]

METADATA_KEY = "cam_engine"
SCHEMA_VERSION = 1
METHODS = ("cam", "gradcam")
HEADS = ("gap-linear", "pool-mlp", "head-vjp")
_EXPORTERS = ("torchscript", "dynamo")

Shape = tuple[int | str, ...]


@dataclass(frozen=True)
class CAMMetadata:
    """What a :func:`~cam_engine.export.to_onnx` file says about itself (keys: module docstring).

    Made from the export, or read with :meth:`from_json` / :meth:`from_session`; every value is
    checked when it is made (``ValueError`` naming the key). Lists of the JSON are tuples here.
    """

    schema_version: int
    version: str
    method: str
    target_layer: str
    head: str
    exporter: str
    topk: int
    num_classes: int
    input_size: tuple[int, int]
    min_input_size: tuple[int, int]
    dynamic_batch: bool
    dynamic_size: bool
    upsample: bool
    normalize: bool
    colormap: str | None
    alpha: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fp16: bool
    inputs: dict[str, Shape]
    outputs: dict[str, Shape]

    def __post_init__(self) -> None:
        _expect(self.schema_version == SCHEMA_VERSION, "schema_version", self.schema_version,
                f"{SCHEMA_VERSION}")  # fmt: skip
        for key in ("version", "target_layer"):
            _expect(isinstance(getattr(self, key), str), key, getattr(self, key), "a string")
        for key, choices in (("method", METHODS), ("head", HEADS), ("exporter", _EXPORTERS)):
            value = getattr(self, key)
            _expect(value in choices, key, value, " or ".join(map(repr, choices)))
        for key in ("topk", "num_classes"):
            _expect(_is_int(getattr(self, key), 1), key, getattr(self, key), "an int >= 1")
        for key in ("input_size", "min_input_size"):
            value = getattr(self, key)
            ok = _is_list(value, 2) and all(_is_int(v, 1) for v in value)
            _expect(ok, key, value, "[H, W] of ints >= 1")
        fits = all(m <= s for m, s in zip(self.min_input_size, self.input_size, strict=True))
        _expect(fits, "min_input_size", self.min_input_size, f"<= input_size {self.input_size}")
        for key in ("dynamic_batch", "dynamic_size", "upsample", "normalize", "fp16"):
            _expect(isinstance(getattr(self, key), bool), key, getattr(self, key), "a bool")
        _expect(self.colormap is None or isinstance(self.colormap, str), "colormap",
                self.colormap, "a string or null")  # fmt: skip
        _expect(_is_number(self.alpha) and 0 <= self.alpha <= 1, "alpha", self.alpha,
                "a number in [0, 1]")  # fmt: skip
        for key in ("mean", "std"):
            value = getattr(self, key)
            ok = _is_list(value, 3) and all(_is_number(v) for v in value)
            _expect(ok, key, value, "3 numbers")
        self._check_io()

    def _check_io(self) -> None:
        """The inputs and outputs the readers rely on: names, and shapes of the right ranks."""
        for key in ("inputs", "outputs"):
            value = getattr(self, key)
            ok = isinstance(value, dict) and all(
                isinstance(shape, tuple) and all(_is_int(d, 1) or isinstance(d, str) for d in shape)
                for shape in value.values()
            )
            _expect(ok, key, value, "{name: shape of ints and axis names}")
        ranks = {"x": 4, "classes": 2, "logits": 2, "heatmaps": 4, "overlay": 5}
        given = "classes" in self.inputs
        _expect(set(self.inputs) == ({"x", "classes"} if given else {"x"}), "inputs",
                self.inputs, "x, and classes with a classes input")  # fmt: skip
        maps = "overlay" if self.colormap is not None else "heatmaps"
        names = ["logits", maps] if given else ["logits", "classes", maps]
        _expect(sorted(self.outputs) == sorted(names), "outputs", self.outputs,
                f"{', '.join(names)} (with colormap {self.colormap!r})")  # fmt: skip
        for name, shape in {**self.inputs, **self.outputs}.items():
            _expect(len(shape) == ranks[name], name, shape, f"a shape of {ranks[name]} axes")
        _expect(_is_int(self.inputs["x"][1], 1), "x", self.inputs["x"], "(B, C, H, W), C an int")

    # JSON ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (lists for tuples), as stored in the file."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CAMMetadata:
        """Read a stored JSON object.

        Raises:
            ValueError: not an object, no or a newer ``schema_version``, missing or unknown keys,
                or a value of the wrong type (the message names the key).
        """
        if not isinstance(data, dict):
            raise ValueError(f"cam_engine metadata: expected a JSON object, got {data!r}")
        version = data.get("schema_version")
        if version is None:
            raise ValueError(
                "cam_engine metadata: no 'schema_version' (written by cam-engine 0.1.0 or "
                "older): export the model again"
            )
        if _is_int(version, 1) and version > SCHEMA_VERSION:
            raise ValueError(
                f"cam_engine metadata: schema version {version} is newer than this cam-engine "
                f"reads ({SCHEMA_VERSION}): upgrade cam-engine"
            )
        keys = {field.name for field in dataclasses.fields(cls)}
        missing, unknown = sorted(keys - set(data)), sorted(set(data) - keys)
        if missing or unknown:
            raise ValueError(
                "cam_engine metadata: "
                + "; ".join(
                    f"{what} key(s) {', '.join(names)}"
                    for what, names in (("missing", missing), ("unknown", unknown))
                    if names
                )
            )
        values = {
            key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
        }
        for key in ("inputs", "outputs"):
            if isinstance(values[key], dict):
                values[key] = {
                    name: tuple(shape) if isinstance(shape, list) else shape
                    for name, shape in values[key].items()
                }
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> CAMMetadata:
        """Read the stored JSON text (:meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cam_engine metadata is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_session(cls, session, source: str = "the model") -> CAMMetadata:
        """Read an ``onnxruntime.InferenceSession``'s metadata.

        Args:
            session: the session of a :func:`~cam_engine.export.to_onnx` file.
            source: the file, for error messages.

        Raises:
            ValueError: the file has no ``"cam_engine"`` entry, or it is not valid
                (:meth:`from_dict`); the message starts with ``source``.
        """
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise ValueError(f"{source} has no {METADATA_KEY!r} metadata: export it with to_onnx")
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    # Inputs -------------------------------------------------------------------------------------

    def check_input(self, shape: Sequence[int]) -> None:
        """``ValueError`` unless images of ``shape`` (B, C, H, W) fit the file.

        C must be the exported channel count, B the exported batch without ``dynamic_batch``,
        and (H, W) ``input_size``, or with ``dynamic_size`` at least ``min_input_size``.
        """
        batch, channels, height, width = shape
        fixed_batch, want_channels = self.inputs["x"][:2]
        if channels != want_channels:
            raise ValueError(f"this file takes {want_channels}-channel images, got {channels}")
        if not self.dynamic_batch and batch != fixed_batch:
            raise ValueError(
                f"this file takes batches of {fixed_batch} (exported without dynamic_batch), "
                f"got {batch}"
            )
        size = f"{height}x{width}"
        if not self.dynamic_size and (height, width) != self.input_size:
            want = "x".join(map(str, self.input_size))
            raise ValueError(f"this file takes {want} images (no dynamic_size), got {size}")
        low_h, low_w = self.min_input_size
        if height < low_h or width < low_w:
            raise ValueError(
                f"images of {size} are below this file's minimum {low_h}x{low_w} (the target "
                "map's stride: a smaller input has less than one map cell and flat maps)"
            )


def _expect(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"cam_engine metadata: {key!r} must be {what}, got {value!r}")


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_list(value: Any, length: int) -> bool:
    return isinstance(value, tuple) and len(value) == length
