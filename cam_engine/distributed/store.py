"""The output folder of a distributed run: every file written atomically, read back to resume.

Layout of ``out/`` (pictures, CSV files and gallery as written by ``cam-engine explain``)::

    job.json                the settings the outputs depend on; a rerun must use the same ones
    shards/<id>.parquet     one per batch: image, class_id, class_name, score (lists of K),
                            height, width, heatmaps (K * H * W float32 bytes, or null)
    failures/<id>.parquet   one per batch with unreadable images: image, reason
                            (``image``: the output name, :func:`cam_engine.pipeline.output_name`)
    overlays/, sheets/      the pictures, ``<name>.<class_id>.png`` and ``<name>.png``
                            (``name``: :func:`cam_engine.pipeline.outputs.picture_name`)
    predictions.csv         image, class_id, class_name, score, picture: one row per explained
                            class, in the inputs' order (``image``: the key; ``picture``: ``name``)
    skipped.csv             image, reason
    index.html              the gallery of the pictures (``html`` in ``save``)
    .tmp/, .lock            files being written; the lock of the run writing

The folder has one run at a time, is bound to its settings, and every file in it is written
atomically (:class:`cam_engine.pipeline.OutputFolder`). A batch's shard is
renamed after its pictures, so an image in a shard is complete. Shard ids hash the batch's image
keys: a batch that Ray retries after a crash replaces its own shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from ..pipeline import Explained, OutputFolder, output_name

__all__ = ["Store", "read_heatmaps"]

SHARDS, FAILURES = "shards", "failures"

SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("class_id", pa.list_(pa.int64())),
        ("class_name", pa.list_(pa.string())),
        ("score", pa.list_(pa.float32())),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("heatmaps", pa.large_binary()),
    ]
)
FAILURE_SCHEMA = pa.schema([("image", pa.string()), ("reason", pa.string())])


class Store(OutputFolder):
    """Reads and writes the output folder ``out`` (see the module's docstring)."""

    def finished(self) -> set[str]:
        found = set()
        for folder in (SHARDS, FAILURES):
            table = self._read(folder, ["image"])
            if table is not None:
                found.update(table["image"].to_pylist())
        return found

    def write_batch(self, results: list[Explained], failures: list[tuple[str, str]]) -> None:
        """Commit a batch: its shard and (if any image was unreadable) its failures file.

        ``failures`` are (key, reason). Both files are named by the hash of all the batch's
        keys, so writing the same batch again replaces them.
        """
        keys = [r.key for r in results] + [key for key, _ in failures]
        name = _batch_id([output_name(key) for key in keys])
        if failures:
            rows = [{"image": output_name(key), "reason": reason} for key, reason in failures]
            table = pa.Table.from_pylist(rows, FAILURE_SCHEMA)
            self._write_table(self.out / FAILURES / f"{name}.parquet", table)
        if results:
            self._write_table(self.out / SHARDS / f"{name}.parquet", _shard_table(results))

    def consolidate(self, keys: Sequence[str]) -> tuple[int, list[tuple[str, str]]]:
        """Write ``predictions.csv`` and ``skipped.csv`` of the images ``keys``, in that order.

        Raises:
            RuntimeError: an image has neither a shard nor a failure record.
        """
        explained = self._first_rows(SHARDS, ["image", "class_id", "class_name", "score"])
        failed = self._first_rows(FAILURES, ["image", "reason"])
        names = {key: output_name(key) for key in keys}
        skipped = self.write_tables(
            keys,
            {key: explained[name] for key, name in names.items() if name in explained},
            {key: failed[name]["reason"] for key, name in names.items() if name in failed},
        )
        return len(keys) - len(skipped), skipped

    def heatmaps(self) -> Iterator[tuple[str, np.ndarray]]:
        """(output name, heatmaps (K, H, W) float32 in [0, 1]) of every explained image, shard
        by shard."""
        seen: set[str] = set()
        columns = ["image", "class_id", "height", "width", "heatmaps"]
        for path in self._files(SHARDS):
            table = pq.read_table(path, columns=columns)
            maps = table["heatmaps"]
            for i, row in enumerate(table.select(columns[:-1]).to_pylist()):
                if row["image"] in seen or not maps[i].is_valid:
                    continue
                seen.add(row["image"])
                shape = (len(row["class_id"]), row["height"], row["width"])
                yield row["image"], np.frombuffer(maps[i].as_buffer(), "<f4").reshape(shape).copy()

    def _files(self, folder: str) -> list[Path]:
        return sorted((self.out / folder).glob("*.parquet"))

    def _read(self, folder: str, columns: list[str]) -> pa.Table | None:
        files = self._files(folder)
        if not files:
            return None
        return pds.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)

    def _first_rows(self, folder: str, columns: list[str]) -> dict[str, dict]:
        """Rows by image key; should a key be in two files (a batch retried with other
        neighbours), the first file in name order wins: both hold the same results."""
        table = self._read(folder, columns)
        rows: dict[str, dict] = {}
        for row in table.to_pylist() if table is not None else []:
            rows.setdefault(row["image"], row)
        return rows

    def _write_table(self, path: Path, table: pa.Table) -> None:
        self.commit(path, lambda temp: pq.write_table(table, str(temp)))


def read_heatmaps(out: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(output name, heatmaps (K, H, W) float32 in [0, 1]) of every image explained into ``out``.

    The maps are at the image's original size, in ``predictions.csv``'s order of classes,
    as ``numpy.load("heatmaps.npz")[name]`` of ``cam-engine explain`` without ``--ray``. The
    output name is the image's key (``predictions.csv``'s ``image``) unless that is not
    printable UTF-8 or too long (:func:`cam_engine.pipeline.output_name`).
    """
    return Store(out).heatmaps()


def _batch_id(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]


def _shard_table(results: list[Explained]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "image": output_name(r.key),
                "class_id": r.classes,
                "class_name": r.names,
                "score": r.scores,
                "height": r.size[0],
                "width": r.size[1],
                "heatmaps": None if r.heatmaps is None else r.heatmaps.astype("<f4").tobytes(),
            }
            for r in results
        ],
        SHARD_SCHEMA,
    )
