"""The output folder of a run: every file written whole, bound to the settings of its outputs."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image
from torch import Tensor

from ..io import save_png
from .outputs import PREDICTION_COLUMNS, prediction_rows, write_skipped

__all__ = ["OutputFolder"]

JOB, TEMP = "job.json", ".tmp"


class OutputFolder:
    """The output folder ``out`` of a run.

    Every file is written under ``.tmp/`` and moved into place with ``os.replace``, an atomic
    rename on one filesystem (``.tmp/`` sits in ``out/``, so the pictures' temporary files can be
    swept in one place however deep the picture is): a reader or a rerun sees a whole file or
    none. ``job.json`` holds the settings the outputs were made with.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    def has_outputs(self) -> bool:
        """Whether the folder holds results that bind it to its settings."""
        raise NotImplementedError

    def check_job(self, settings: Mapping[str, object]) -> None:
        """Record ``settings`` in ``job.json``; ``ValueError`` if the folder holds outputs made
        with other settings (a folder without outputs takes the new ones)."""
        settings = json.loads(json.dumps(settings))
        path = self.out / JOB
        if not (path.exists() and self.has_outputs()):
            self.replace(path, lambda temp: temp.write_text(json.dumps(settings, indent=2)))
            return
        before = json.loads(path.read_text())
        changed = [
            f"{name}: {before.get(name)!r} there, {settings.get(name)!r} now"
            for name in sorted(before.keys() | settings.keys())
            if before.get(name) != settings.get(name)
        ]
        if changed:
            raise ValueError(
                f"{self.out} holds the outputs of another job ({'; '.join(changed)}); "
                "rerun with the same settings to resume it, or choose another --out"
            )

    def clear_temp(self) -> None:
        """Delete the files that a crashed or killed run left half-written."""
        shutil.rmtree(self.out / TEMP, ignore_errors=True)

    def replace(self, path: Path, write: Callable[[Path], object]) -> None:
        """Write ``path`` through a temporary file under ``.tmp/`` and an atomic rename."""
        temp = self.out / TEMP / f"{uuid.uuid4().hex}{path.suffix}"
        temp.parent.mkdir(parents=True, exist_ok=True)
        write(temp)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, path)

    def write_text(self, path: Path, fill: Callable[[io.TextIOBase], object]) -> None:
        """Write the text file ``path`` atomically; ``fill(file)`` writes its content."""

        def write(temp: Path) -> None:
            with open(temp, "w", newline="") as file:
                fill(file)

        self.replace(path, write)

    def write_pictures(self, found: Iterable[tuple[str, Tensor | Image.Image]]) -> None:
        """Write pictures (path relative to ``out``, picture) atomically, as PNG files."""
        for name, picture in found:
            self.replace(self.out / name, lambda temp, picture=picture: save_png(temp, picture))

    def write_tables(
        self, keys: Sequence[str], explained: Mapping[str, dict], failed: Mapping[str, str]
    ) -> list[tuple[str, str]]:
        """Write ``predictions.csv`` and ``skipped.csv`` of the images ``keys``, in that order.

        Args:
            keys: every input image.
            explained: key -> ``{"class_id": [...], "class_name": [...], "score": [...]}``.
            failed: key -> why it could not be decoded or explained.

        Returns:
            (key, reason) of the images not explained.

        Raises:
            RuntimeError: an image has neither results nor a reason.
        """
        missing = [key for key in keys if key not in explained and key not in failed]
        if missing:
            raise RuntimeError(f"{len(missing)} images have no output, e.g. {missing[:3]}")
        rows = [PREDICTION_COLUMNS]
        for key in keys:
            if key in explained:
                record = explained[key]
                rows += prediction_rows(
                    key, record["class_id"], record["class_name"], record["score"]
                )
        self.write_text(self.out / "predictions.csv", lambda f: csv.writer(f).writerows(rows))
        skipped = [(key, failed[key]) for key in keys if key not in explained]
        self.write_text(self.out / "skipped.csv", lambda file: write_skipped(file, skipped))
        return skipped
