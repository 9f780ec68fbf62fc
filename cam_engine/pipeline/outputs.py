"""What a run writes for each image: its output name, its CSV rows, its pictures."""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from ..io import contact_sheet_rows, probability_text, rgb_rows
from .compute import Explained, sheet_tiles

__all__ = [
    "PREDICTION_COLUMNS",
    "output_name",
    "overlay_file",
    "picture_name",
    "pictures",
    "prediction_rows",
    "sheet_file",
    "write_skipped",
]

#: ``picture`` is the image's :func:`picture_name`: its sheet is ``sheets/<picture>.png``, its
#: overlays ``overlays/<picture>.<class_id>.png`` (last, so the earlier columns keep their places)
PREDICTION_COLUMNS = ["image", "class_id", "class_name", "score", "picture"]
#: longest part of an output name, in UTF-8 bytes: ``<part>.<class_id>.png`` stays under the
#: 255 bytes that file systems allow
NAME_BYTES = 200


def output_name(key: str) -> str:
    """The name of an image's outputs (pictures, NPZ entry, shard row): its key, made safe.

    Each ``/``-separated part of the key that is not valid UTF-8 (a file name's undecodable
    bytes), holds control characters (a newline) or is longer than ``NAME_BYTES`` bytes becomes
    ``<readable prefix>~<16 hex digits of its SHA-256>``; other parts are kept as they are, so
    that ``output_name("a/1.jpg") == "a/1.jpg"``. Distinct keys get distinct names.
    """
    return "/".join(_safe_part(part) for part in key.split("/"))


def picture_name(key: str) -> str:
    """The name of an image's pictures, before ``.png`` (sheet) or ``.<class_id>.png`` (overlay).

    :func:`output_name` of the key with the last dot of its file name made an underscore, so
    that ``sheets/`` holds ``astronaut_png.png``, not ``astronaut.png.png``, and ``a.png`` and
    ``a.jpg`` stay apart (``a_png``, ``a_jpg``). A file name without a plain extension (letters
    and digits after its last dot) gets ``~<16 hex digits of its SHA-256>`` instead, so that
    ``a_png`` (no extension) is not ``a.png``'s name: distinct keys get distinct names.
    """
    folder, _, name = key.rpartition("/")
    plain = re.fullmatch(r"(.+)\.([0-9A-Za-z]+)", name)
    name = f"{plain[1]}_{plain[2]}" if plain else f"{name}~{_digest(name)}"
    return output_name(f"{folder}/{name}" if folder else name)


def sheet_file(picture: str) -> str:
    """The contact sheet of the image named ``picture`` (:func:`picture_name`), relative to the
    output folder."""
    return f"sheets/{picture}.png"


def overlay_file(picture: str, class_id: int | str) -> str:
    """The overlay of class ``class_id`` on the image named ``picture``, relative to the output
    folder."""
    return f"overlays/{picture}.{class_id}.png"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _safe_part(part: str) -> str:
    odd = [ch for ch in part if unicodedata.category(ch) in ("Cc", "Cs")]
    if not odd and len(part.encode("utf-8")) <= NAME_BYTES:
        return part
    digest = _digest(part)
    readable = "".join("_" if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in part)
    readable = readable.encode("utf-8")[: NAME_BYTES // 2].decode("utf-8", "ignore")
    return f"{readable}~{digest}"


def prediction_rows(
    key: str, classes: list[int], names: list[str], scores: list[float]
) -> list[list]:
    """``predictions.csv`` rows of one image (see :data:`PREDICTION_COLUMNS`), one per class."""
    picture = picture_name(key)
    return [
        [key, c, name, f"{p:.6g}", picture]
        for c, name, p in zip(classes, names, scores, strict=True)
    ]


def write_skipped(file: TextIO, rows: list[tuple[str, str]]) -> None:
    """``skipped.csv``: the header ``image, reason`` and one row per unreadable image."""
    table = csv.writer(file)
    table.writerow(["image", "reason"])
    table.writerows(rows)


def pictures(result: Explained, save: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """The overlay PNGs and the contact sheet of one image.

    The tensor work (the pixels laid out as NumPy rows: views of channels-last overlays and
    tiles, no copy; the tiles scaled by :func:`~.compute.sheet_tiles` if the result has none)
    is done when this is called; the pictures are drawn when the result is iterated (the
    sheet's titles drawn), with PIL and NumPy only, which release the GIL. A thread pool that
    iterates it and writes the PNGs then takes that work off the engine's thread and runs no
    torch operation: those would start torch threads of their own next to the engine's.

    Args:
        result: the image's results, with its original and overlays (none: no pictures).
        save: which pictures (``"png"``, ``"sheet"``; other names are ignored).

    Returns:
        An iterator of (path relative to the output folder, picture for
        :func:`cam_engine.io.save_png`): (H, W, 3) uint8 RGB rows, NumPy arrays.
    """
    save = set(save)
    if result.overlays is None or not save & {"png", "sheet"}:
        return iter(())
    overlays = rgb_rows(result.overlays) if "png" in save else None  # views: no copy
    tiles = None
    if "sheet" in save:
        tiles = result.tiles
        if tiles is None:
            tiles = sheet_tiles(result.image[None], result.overlays[None])[0]
        tiles = rgb_rows(tiles)
    return _draw(result, overlays, tiles)


def _draw(
    result: Explained, overlays: np.ndarray | None, tiles: np.ndarray | None
) -> Iterator[tuple[str, np.ndarray]]:
    if overlays is not None:
        for c, rows in zip(result.classes, overlays, strict=True):
            yield overlay_file(picture_name(result.key), c), rows
    if tiles is not None:
        titles = [Path(result.key).name] + [
            f"{name} p={probability_text(p)}"
            for name, p in zip(result.names, result.scores, strict=True)
        ]
        yield sheet_file(picture_name(result.key)), contact_sheet_rows(tiles[None], [titles])
