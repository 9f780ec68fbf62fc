"""Every setting of an explain run, checked in one place: :class:`ExplainConfig`."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .. import methods
from ..arguments import MAX_PIXELS, SAVE_CHOICES, default_workers, size_pair
from ..postprocess import colormap_lut
from ..targets import BottomK, TopK

__all__ = ["SAVE_CHOICES", "ExplainConfig", "Targets", "parse_targets", "targets_text"]

Targets = TopK | BottomK | tuple[int, ...]


def parse_targets(text: str) -> TopK | BottomK | list[int]:
    """``"top3"`` -> ``TopK(3)``, ``"bottom2"`` -> ``BottomK(2)``, ``"7,2"`` -> ``[7, 2]``."""
    ranked = re.fullmatch(r"(top|bottom)(\d*)", text.strip().lower())
    if ranked:
        k = int(ranked[2] or 1)
        if k < 1:
            raise ValueError(f"--targets {text}: k must be at least 1")
        return TopK(k) if ranked[1] == "top" else BottomK(k)
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--targets {text!r}: use topK, bottomK or comma-separated class ids"
        ) from None
    return _class_ids(ids, text)


def _class_ids(ids: Sequence[int], text: object) -> list[int]:
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(f"--targets {text!r}: class ids must be distinct and >= 0")
    return list(ids)


def targets_text(targets: Targets) -> str:
    """``--targets`` text of parsed targets: ``TopK(3)`` -> ``"top3"``, ``(7, 2)`` -> ``"7,2"``."""
    if isinstance(targets, TopK):
        return f"top{targets.k}"
    if isinstance(targets, BottomK):
        return f"bottom{targets.k}"
    return ",".join(map(str, targets))


def _numbers(value: object, kind: type, what: str) -> tuple | None:
    """``"1,2,3"`` / ``"64x48"`` / ``64`` / ``[1, 2]`` -> a tuple of ``kind``, ``None`` stays."""
    if value is None:
        return None
    parts = re.split(r"[,x]", value) if isinstance(value, str) else value
    if isinstance(parts, int | float):
        parts = [parts]
    try:
        return tuple(kind(part) for part in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r}: expected comma-separated numbers") from None


@dataclass(frozen=True)
class ExplainConfig:
    """The settings of ``cam-engine explain``, by their option names (``--batch-size`` ->
    ``batch_size``).

    Each field also takes the command line's text (``targets="top2"``, ``input_size="64"``,
    ``mean="0,0,0"``, ``save="png,npz"``) and is stored normalised, with the type below. Bad
    values raise ``ValueError`` when the config is made, before any model or image is read.

    Attributes:
        images: image files and folders (folders are searched recursively).
        model: a torchvision classifier name, a ``torch.save(model)`` file, or
            ``module:function`` / ``file.py:function`` (see :func:`cam_engine.loading.load_model`).
        out: the output folder.
        weights: ``"DEFAULT"``, a torchvision weights name, or a ``state_dict`` file.
        labels: a class-names file, one per line.
        target_layer: module or FX node name; ``None``: the last feature map.
        method: a name of :func:`cam_engine.methods.available`.
        targets: ``TopK(k)``, ``BottomK(k)`` or class ids (text: ``top3``, ``bottom2``, ``7,2``).
        batch_size: images per engine call.
        workers: image decoding threads (0: decode in the main thread, between batches).
        device: a torch device name; ``None``: cuda if available, else cpu.
        compile: run the trunk through ``torch.compile``.
        channels_last: channels-last trunk input; ``None``: on a CPU only.
        input_size: (H, W) the images are resized to; ``None``: the weights' crop size, else 224.
        mean, std: 3 normalisation values each; ``None``: the weights' or ImageNet's.
        num_classes: outputs of a torchvision model loaded with a ``state_dict`` file.
        allow_pickle: let ``model`` be a full-model pickle (unpickling runs the file's code).
        colormap: colour map of the overlays; alpha: weight of its colour, in [0, 1].
        save: which of ``SAVE_CHOICES`` to write (``predictions.csv`` always is): overlay
            PNGs, contact sheets, ``heatmaps.npz``, ``index.html`` (the gallery).
        max_pixels: images with more pixels (read from the file's header) are skipped undecoded.
        overwrite: delete the outputs of other settings in ``out`` instead of refusing them.
        ray: ``None`` for this process; a Ray address (``"local"``, ``"auto"``, ``host:port``)
            for :func:`cam_engine.distributed.explain_dataset`.
        actors: model replicas on Ray; ``None``: one per GPU of the cluster, else one per CPU.
    """

    images: tuple[str, ...]
    model: str
    out: Path = Path("out/explain")
    weights: str | None = None
    labels: Path | None = None
    target_layer: str | None = None
    method: str = "gradcam"
    targets: Targets = TopK(1)
    batch_size: int = 16
    workers: int = field(default_factory=default_workers)
    device: str | None = None
    compile: bool = False
    channels_last: bool | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    num_classes: int | None = None
    allow_pickle: bool = False
    colormap: str = "jet"
    alpha: float = 0.5
    save: frozenset[str] = frozenset(SAVE_CHOICES)
    max_pixels: int = MAX_PIXELS
    overwrite: bool = False
    ray: str | None = None
    actors: int | None = None

    def __post_init__(self) -> None:
        images = [self.images] if isinstance(self.images, str | os.PathLike) else self.images
        self._set("images", tuple(str(image) for image in images))
        if not self.images:
            raise ValueError("no images or folders given")
        self._set("out", Path(self.out))
        self._set("labels", None if self.labels is None else Path(self.labels))
        self._set("targets", _targets(self.targets))
        self._set("input_size", _input_size(self.input_size))
        for name in ("mean", "std"):
            values = _numbers(getattr(self, name), float, f"--{name}")
            if values is not None and (len(values) != 3 or (name == "std" and min(values) <= 0)):
                raise ValueError(f"--{name} needs 3 values (std > 0), got {values}")
            self._set(name, values)
        self._set("save", _save(self.save))
        methods.get(self.method)
        colormap_lut(self.colormap)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("--batch-size must be >= 1 and --workers >= 0")
        if self.actors is not None and self.actors < 1:
            raise ValueError("--actors must be >= 1")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("--num-classes must be >= 1")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"--device {self.device!r}: {exc}") from None

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen dataclass's own field

    @classmethod
    def names(cls) -> list[str]:
        """The field names, which are also the options' Python names."""
        return [f.name for f in fields(cls)]

    def settings(self) -> dict[str, object]:
        """The settings that shape the outputs, as JSON values: a rerun into the same folder
        must repeat them to add to its outputs.

        Files are named by absolute path, and the model, weights and labels files also by the
        SHA-256 of their content: other weights saved at the same path are other settings.
        """
        files = {"model": self.model, "weights": self.weights, "labels": self.labels}
        return {
            **{name: absolute(spec) for name, spec in files.items()},
            **{f"{name}_sha256": _sha256(spec) for name, spec in files.items()},
            "ray": self.ray is not None,
            "num_classes": self.num_classes,
            "target_layer": self.target_layer,
            "method": self.method,
            "targets": targets_text(self.targets),
            "input_size": None if self.input_size is None else list(self.input_size),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "colormap": self.colormap,
            "alpha": self.alpha,
            # index.html is rewritten whole by every run: it does not bind the folder
            "save": ",".join(sorted(self.save - {"html"})),
        }


def absolute(spec: str | os.PathLike | None) -> str | None:
    """A file (or the file of ``file.py:function``) as an absolute path; other specs as given."""
    if spec is None:
        return None
    spec = str(spec)
    path, sep, function = spec.rpartition(".py:")
    if sep and Path(path + ".py").is_file():
        return f"{Path(path + '.py').absolute()}:{function}"
    return str(Path(spec).absolute()) if Path(spec).is_file() else spec


def _sha256(spec: str | os.PathLike | None) -> str | None:
    """SHA-256 of the file that ``spec`` names (``file.py:function``: the ``.py``), if any."""
    path = absolute(spec)
    if path is not None and not Path(path).is_file():
        path = path.rpartition(":")[0]  # file.py:function, or not a file at all
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _targets(value: object) -> Targets:
    if isinstance(value, TopK | BottomK):
        if value.k < 1:
            raise ValueError(f"--targets {value}: k must be at least 1")
        return value
    if isinstance(value, str):
        value = parse_targets(value)
        return value if isinstance(value, TopK | BottomK) else tuple(value)
    if isinstance(value, int):
        value = [value]
    return tuple(_class_ids([int(i) for i in value], value))


def _input_size(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return size_pair(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--input-size: {exc}") from None


def _save(value: str | Iterable[str]) -> frozenset[str]:
    """``"png,npz"`` (or ``{"png", "npz"}``) -> ``frozenset({"png", "npz"})``."""
    parts = value.split(",") if isinstance(value, str) else value
    chosen = frozenset(part.strip() for part in parts if part.strip())
    unknown = chosen - set(SAVE_CHOICES)
    if unknown:
        raise ValueError(f"--save: unknown {sorted(unknown)}; choose from {','.join(SAVE_CHOICES)}")
    return chosen
