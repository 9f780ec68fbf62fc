"""The results of a run in this process, kept batch by batch and merged at the end.

Layout of ``out/`` besides the pictures (see :mod:`.folder` for ``job.json``, ``.lock``,
``.tmp/``)::

    parts/<id>.npz      one per batch, committed (renamed into place) after its pictures:
                        ``record``, the batch's results and failures as JSON bytes, and the
                        heatmaps of its i-th explained image as ``<i>`` (with ``--save npz``)
    predictions.csv     merged at the end of a run from the parts and the earlier merged
    skipped.csv         files, each replaced atomically; then the parts are deleted
    heatmaps.npz        (the heatmaps of this run's parts are copied into a temporary file under
                        ``.tmp/`` as each part commits, so the end has little left to copy)

A run killed at any point leaves whole files only: its rerun finds the images done in the parts
and in the merged files, and explains the others.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import NpzWriter
from .compute import Explained
from .folder import TEMP, OutputFolder
from .outputs import output_name

__all__ = ["Parts"]

PARTS, RECORD = "parts", "record"


class Parts(OutputFolder):
    """The output folder of a run in this process.

    Args:
        out: the folder.
        npz: whether the run keeps heatmaps (``heatmaps.npz``).
    """

    def __init__(self, out: str | Path, npz: bool) -> None:
        super().__init__(out)
        self.npz = npz
        self._merge: NpzWriter | None = None  # this run's heatmaps, copied as batches commit
        self._merged: set[Path] = set()  # the parts copied into it

    def close(self) -> None:
        """Drop the merge of a run that did not reach :meth:`consolidate` (its parts remain)."""
        if self._merge is not None:
            self._merge.close()
            self._merge.path.unlink(missing_ok=True)
            self._merge = None

    def finished(self) -> set[str]:
        return set(self._outcomes())

    def write_batch(self, results: list[Explained], failures: list[tuple[str, str]]) -> None:
        """Commit a batch (its pictures written): its results and (key, reason) failures."""
        record = [
            {
                "name": output_name(r.key),
                "class_id": r.classes,
                "class_name": r.names,
                "score": r.scores,
            }
            for r in results
        ] + [{"name": output_name(key), "reason": reason} for key, reason in failures]

        def write(temp: Path) -> None:
            with NpzWriter(temp) as npz:
                npz.add(RECORD, np.frombuffer(json.dumps(record).encode(), np.uint8))
                for i, result in enumerate(results if self.npz else []):
                    npz.add(str(i), result.heatmaps)

        path = self.out / PARTS / f"{uuid.uuid4().hex}.npz"
        self.commit(path, write)
        if self.npz and results:
            self._merge_part(path, {str(i): output_name(r.key) for i, r in enumerate(results)})

    def _merge_part(self, path: Path, keys: dict[str, str]) -> None:
        """Copy a committed part's heatmaps (part key -> output name) into this run's merge, and
        put them on the disk: the end of the run then has little left to copy or flush. The
        merge is a temporary file; the parts stay the record until heatmaps.npz is committed."""
        if self._merge is None:
            self._merge = NpzWriter(self.out / TEMP / f"heatmaps-{uuid.uuid4().hex}.npz")
        self._merge.copy(path, keys)
        self._merge.sync()
        self._merged.add(path)

    def consolidate(self, keys: Sequence[str]) -> tuple[int, list[tuple[str, str]]]:
        outcomes = self._outcomes()
        explained, failed = {}, {}
        for key in keys:
            record = outcomes.get(output_name(key))
            if record is not None and "reason" in record:
                failed[key] = record["reason"]
            elif record is not None:
                explained[key] = record
        skipped = self.write_tables(keys, explained, failed)
        if self.npz:
            names = {output_name(key) for key in explained}
            self.commit(self.out / "heatmaps.npz", lambda temp: self._merge_heatmaps(temp, names))
        shutil.rmtree(self.out / PARTS, ignore_errors=True)
        return len(explained), skipped

    def _parts(self) -> list[Path]:
        return sorted((self.out / PARTS).glob("*.npz"))

    def _outcomes(self) -> dict[str, dict]:
        """Output name -> ``{"class_id", "class_name", "score"}`` or ``{"reason"}`` of every
        image done: in the merged tables of earlier runs, then in the parts."""
        outcomes: dict[str, dict] = {}
        for row in self.read_table("predictions.csv"):
            record = outcomes.setdefault(
                output_name(row["image"]), {"class_id": [], "class_name": [], "score": []}
            )
            record["class_id"].append(int(row["class_id"]))
            record["class_name"].append(row["class_name"])
            record["score"].append(float(row["score"]))
        for row in self.read_table("skipped.csv"):
            outcomes[output_name(row["image"])] = {"reason": row["reason"]}
        for path in self._parts():
            with np.load(path) as part:
                for record in json.loads(part[RECORD].tobytes()):
                    outcomes[record.pop("name")] = record
        return outcomes

    def _merge_heatmaps(self, temp: Path, names: set[str]) -> None:
        """Write the heatmaps of the images ``names`` (output names) into ``temp``: this run's
        merge, then the parts not in it, then the ``heatmaps.npz`` of earlier runs; copied as
        they are stored (no decoding, no second checksum)."""
        merged, self._merge = self._merge or NpzWriter(temp), None
        wanted = set(names) - merged.keys
        with merged:
            for path in self._parts():
                if path in self._merged:
                    continue
                with np.load(path) as part:
                    records = json.loads(part[RECORD].tobytes())
                done = [r["name"] for r in records if "reason" not in r]
                keys = {str(i): name for i, name in enumerate(done) if name in wanted}
                merged.copy(path, keys)
                wanted -= set(keys.values())
            earlier = self.out / "heatmaps.npz"
            if wanted and earlier.exists():
                with np.load(earlier) as before:
                    found = sorted(wanted & set(before.files))
                merged.copy(earlier, {name: name for name in found})
                wanted -= set(found)
        if merged.path != temp:
            os.replace(merged.path, temp)
        if wanted:
            raise RuntimeError(
                f"{self.out}: the heatmaps of {len(wanted)} explained images are missing (e.g. "
                f"{sorted(wanted)[:3]}); rerun with --overwrite"
            )
