"""The output folder of a run: one run at a time, bound to its settings, every file whole.

- **Lock**: a run holds ``fcntl.flock`` on ``out/.lock`` while it works; a second run into the
  same folder is refused. The OS drops the lock when its process dies, however it dies, so a lock
  file left behind never blocks.
- **Settings**: ``job.json`` holds the settings the outputs were made with; a run with other
  settings is refused, unless ``overwrite`` deletes the old outputs first.
- **Atomic files**: every file is written under ``.tmp/`` and moved into place with
  ``os.replace``, an atomic rename on one filesystem (``.tmp/`` sits in ``out/``, so the
  temporary files can be swept in one place however deep the file is): a reader or a rerun sees
  a whole file or none. A full disk stops the run with one clear ``ValueError``.

Subclasses keep the results of finished images (:meth:`finished`, :meth:`consolidate`): per-batch
NPZ parts in this process (:class:`cam_engine.pipeline.parts.Parts`), Parquet shards on Ray
(:class:`cam_engine.distributed.store.Store`).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image
from torch import Tensor

from ..io import save_png
from .outputs import PREDICTION_COLUMNS, prediction_rows, write_skipped

__all__ = ["OutputFolder"]

JOB, TEMP, LOCK = "job.json", ".tmp", ".lock"
#: what runs write into a folder, all of which --overwrite deletes
OUTPUTS = (
    "predictions.csv", "skipped.csv", "heatmaps.npz", "overlays", "sheets", "parts", "shards",
    "failures", "index.html",
)  # fmt: skip


class OutputFolder:
    """The output folder ``out`` (see the module's docstring)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    def finished(self) -> set[str]:
        """Output names (:func:`~cam_engine.pipeline.output_name`) of the images with an
        outcome in the folder: explained, or recorded as failed."""
        raise NotImplementedError

    def consolidate(self, keys: Sequence[str]) -> tuple[int, list[tuple[str, str]]]:
        """Write the tables of the images ``keys`` (all of them have an outcome).

        Returns:
            (how many of them were explained, (key, reason) of the others).
        """
        raise NotImplementedError

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (creating the folder); ``ValueError`` if another run holds it,
        or if ``out`` cannot be a folder written to. A run's first step: nothing is written
        before."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is not a folder")
        path = self.out / LOCK
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            file = open(path, "a")  # the lock lives as long as this file is open
        except OSError as exc:
            raise ValueError(f"--out {self.out}: cannot write there ({exc.strerror})") from None
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(
                    f"another run is writing into {self.out} (it holds the lock {path}); wait "
                    "for it to finish or choose another --out"
                ) from None
            yield

    @contextmanager
    def disk_full_is_fatal(self) -> Iterator[None]:
        """Turn a full disk (``ENOSPC``) into one ``ValueError`` line that says what to do."""
        try:
            yield
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise ValueError(
                f"no space left on the disk of {self.out} ({exc.filename or exc}); free some "
                "and rerun the same command: it resumes where this run stopped"
            ) from exc

    def start(self, settings: Mapping[str, object], overwrite: bool = False) -> None:
        """Bind the folder to ``settings`` (in ``job.json``), with the lock held.

        A folder without outputs takes the settings; one with outputs made with the same
        settings is resumed. ``overwrite`` deletes the outputs first. Files that a killed run
        left half-written are deleted.

        Raises:
            ValueError: the folder holds outputs of other settings (or of an unknown run).
        """
        settings = json.loads(json.dumps(settings))
        if overwrite:
            for name in (*OUTPUTS, JOB):
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        self.clear_temp()
        path = self.out / JOB
        if any((self.out / name).exists() for name in OUTPUTS):
            if not path.exists():
                raise ValueError(
                    f"{self.out} holds outputs without a {JOB} (of an earlier version, or not "
                    "of cam-engine): pass --overwrite to delete them, or choose another --out"
                )
            before = json.loads(path.read_text())
            changed = [
                f"{name}: {before.get(name)!r} there, {settings.get(name)!r} now"
                for name in sorted(before.keys() | settings.keys())
                if before.get(name) != settings.get(name)
            ]
            if changed:
                raise ValueError(
                    f"{self.out} holds the outputs of other settings ({'; '.join(changed)}); "
                    "rerun with the same settings to resume, pass --overwrite to delete them "
                    "and start again, or choose another --out"
                )
        self.replace(path, lambda temp: temp.write_text(json.dumps(settings, indent=2)))

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

    def commit(self, path: Path, write: Callable[[Path], object]) -> None:
        """:meth:`replace`, with the data on the disk before the rename: the rename commits a
        batch, so that its file is whole even after a power cut."""

        def durable(temp: Path) -> None:
            write(temp)
            with open(temp, "rb") as file:
                os.fsync(file.fileno())

        self.replace(path, durable)

    def write_text(self, path: Path, fill: Callable[[TextIO], object]) -> None:
        """Write the text file ``path`` atomically; ``fill(file)`` writes its content.

        UTF-8, except that the undecodable bytes of a file name are written back as they are.
        """

        def write(temp: Path) -> None:
            with open(temp, "w", newline="", encoding="utf-8", errors="surrogateescape") as file:
                fill(file)

        self.replace(path, write)

    def read_table(self, name: str) -> list[dict[str, str]]:
        """The rows of the folder's CSV file ``name`` (none if it does not exist), with the
        undecodable bytes of file names as :meth:`write_text` wrote them."""
        path = self.out / name
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
            return list(csv.DictReader(file))

    def write_pictures(
        self, found: Iterable[tuple[str, Tensor | np.ndarray | Image.Image]]
    ) -> None:
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
