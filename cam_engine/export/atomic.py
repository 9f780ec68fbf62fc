"""Write, check, then rename: a file being replaced is never seen half written.

The export writes each file into a fresh hidden folder beside its destination (the same file
system, so ``os.replace`` is atomic), checks it there, and only then moves it into place. An
exception (a failed check, a full disk) deletes the folder and leaves the previous file as it
was; a killed process leaves the folder behind (``.<name>.*.tmp``) and the previous file intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replacing", "sidecar"]


def sidecar(path: Path) -> Path:
    """The external-data file ``<name>.data`` that an ONNX file past 2 GB refers to."""
    return path.with_name(path.name + ".data")


@contextmanager
def replacing(*destinations: Path) -> Iterator[list[Path]]:
    """Temporary paths to write ``destinations`` at, moved onto them if the block succeeds.

    Each temporary path has its destination's name, in a new folder ``.<name>.<random>.tmp``
    beside it, so a relative reference (the :func:`sidecar`) resolves the same in both places.
    On a normal exit each file's sidecar, when one was written, replaces the destination's (a
    stale one is removed after the file moves), then the file replaces its destination; on an
    exception nothing moves. The folders are removed either way.

    Yields:
        One temporary path per destination, in order.
    """
    folders: list[Path] = []
    try:
        for destination in destinations:
            folder = tempfile.mkdtemp(".tmp", f".{destination.name}.", destination.parent)
            folders.append(Path(folder))
        staged = [folder / d.name for folder, d in zip(folders, destinations, strict=True)]
        yield staged
        for temporary, destination in zip(staged, destinations, strict=True):
            _move(temporary, destination)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def _move(temporary: Path, destination: Path) -> None:
    # between the two renames of a large model the graph and its data do not match: a window
    # of one system call, in either order
    has_data = sidecar(temporary).is_file()
    if has_data:
        os.replace(sidecar(temporary), sidecar(destination))
    os.replace(temporary, destination)
    if not has_data:
        sidecar(destination).unlink(missing_ok=True)
