"""What a run writes for each image: its CSV rows, its pictures."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

from ..io import contact_sheet
from .compute import Explained

__all__ = [
    "PREDICTION_COLUMNS",
    "SHEET_TILE",
    "pictures",
    "prediction_rows",
    "write_skipped",
]

PREDICTION_COLUMNS = ["image", "class_id", "class_name", "score"]
#: longest side of a contact-sheet tile; overlays themselves are always at full size
SHEET_TILE = 512

def prediction_rows(
    key: str, classes: list[int], names: list[str], scores: list[float]
) -> list[list]:
    """``predictions.csv`` rows of one image (see :data:`PREDICTION_COLUMNS`), one per class."""
    return [[key, c, name, f"{p:.6g}"] for c, name, p in zip(classes, names, scores, strict=True)]


def write_skipped(file: TextIO, rows: list[tuple[str, str]]) -> None:
    """``skipped.csv``: the header ``image, reason`` and one row per unreadable image."""
    table = csv.writer(file)
    table.writerow(["image", "reason"])
    table.writerows(rows)


def pictures(result: Explained, save: Iterable[str]) -> Iterator[tuple[str, Tensor | Image.Image]]:
    """The overlay PNGs and the contact sheet of one image, rendered when iterated.

    Args:
        result: the image's results, with its original and overlays (none: no pictures).
        save: which pictures (``"png"``, ``"sheet"``; other names are ignored).

    Yields:
        (path relative to the output folder, picture for :func:`cam_engine.io.save_png`).
    """
    if result.overlays is None:
        return
    if "png" in save:
        for c, tile in zip(result.classes, result.overlays, strict=True):
            yield f"overlays/{result.key}.{c}.png", tile
    if "sheet" in save:
        titles = [Path(result.key).name] + [
            f"{name} p={p:.2f}" for name, p in zip(result.names, result.scores, strict=True)
        ]
        tiles = _shrink(torch.cat([result.image[None], result.overlays]))
        yield f"sheets/{result.key}.png", contact_sheet(tiles[None], [titles])


def _shrink(tiles: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 tiles scaled so that their longest side is at most ``SHEET_TILE``."""
    height, width = tiles.shape[-2:]
    scale = SHEET_TILE / max(height, width)
    if scale >= 1:
        return tiles
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return TF.resize(tiles, size, antialias=True)
