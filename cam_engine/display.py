"""A :class:`~cam_engine.CAMResult` on screen: a matplotlib figure of each image with its
overlays (``res.show(images)``), and the picture a notebook shows for a result (its
``_repr_html_``).

Each map is titled with its class's name and softmax probability to 3 significant digits
(``"cat p=0.870"``, ``"class 17 p=0.00123"``). Both draw at most ``MAX_IMAGES`` images and
``MAX_MAPS`` maps per image (a notebook's preview ``PREVIEW_MAPS``), so a big batch gives a
small figure or notebook output. matplotlib
is loaded only by :func:`figure`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from io import BytesIO
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .io import contact_sheet, probability_text
from .postprocess import colorize, overlay

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MAX_IMAGES",
    "MAX_MAPS",
    "PREVIEW_MAPS",
    "PREVIEW_TILE",
    "figure",
    "preview_html",
    "titles",
]

MAX_IMAGES = 8
MAX_MAPS = 8
#: maps per image, and longest side of a map in pixels, of a notebook's preview: about 220 kB
#: of inline PNG for 8 images of network maps, 410 kB at worst (noise)
PREVIEW_MAPS = 4
PREVIEW_TILE = 96


def titles(classes: Tensor, logits: Tensor, labels: Sequence[str] | None = None) -> list[list[str]]:
    """The title of each map: its class's name and, for (B, N) logits, its softmax probability.

    Args:
        classes: (B, K) class ids; -1 (a score function's map) is titled ``"score"``.
        logits: (B, N) scores; other shapes (a segmentation model's) give no probability.
        labels: class names by id; ``None``, or an id past its end: ``"class 17"``.

    Returns:
        B lists of K titles, e.g. ``"cat p=0.870"``.
    """
    ids = classes.detach().cpu().long()
    probabilities = None
    if logits.ndim == 2:
        p = logits.detach().cpu().double().softmax(1)
        probabilities = p.gather(1, ids.clamp(min=0)).tolist()
    rows = []
    for b, row in enumerate(ids.tolist()):
        names = []
        for k, c in enumerate(row):
            name = labels[c] if labels is not None and 0 <= c < len(labels) else f"class {c}"
            if c < 0:
                names.append("score")
            elif probabilities is None:
                names.append(name)
            else:
                names.append(f"{name} p={probability_text(probabilities[b][k])}")
        rows.append(names)
    return rows


def figure(
    heatmaps: Tensor,
    classes: Tensor,
    logits: Tensor,
    images: Tensor | None = None,
    labels: Sequence[str] | None = None,
    *,
    colormap: str = "jet",
    alpha: float = 0.5,
    max_images: int = MAX_IMAGES,
    max_maps: int = MAX_MAPS,
) -> Figure:
    """One row per image: the image, then its overlays, each titled (see :func:`titles`).

    Args:
        heatmaps: (B, K, H, W) in [0, 1]; classes: (B, K); logits: (B, N).
        images: (B, 3, H, W) RGB, uint8 or floating point in [0, 1], the heatmaps' size;
            ``None``: the heatmaps alone, coloured.
        labels: class names by id.
        colormap, alpha: as :func:`cam_engine.overlay`.
        max_images, max_maps: the first images and maps drawn; the figure's title says how
            many there were.

    Returns:
        A ``matplotlib.figure.Figure`` made without pyplot: a notebook shows it once, with no
        backend needed (``fig.savefig(...)`` writes it, on any machine).
    """
    from matplotlib.figure import Figure

    _check(heatmaps)
    if images is not None and images.shape[:1] != heatmaps.shape[:1]:
        raise ValueError(
            f"images {tuple(images.shape)} and heatmaps {tuple(heatmaps.shape)}: one image per "
            "row of heatmaps"
        )
    count, maps = heatmaps.shape[:2]
    b, k = min(count, max_images), min(maps, max_maps)
    shown = heatmaps[:b, :k].detach().cpu()
    if images is None:
        tiles, first = colorize(shown, colormap), []
    else:
        pictures = images[:b].detach().cpu()
        tiles = overlay(pictures, shown, colormap, alpha)
        if pictures.is_floating_point():  # as overlay reads them
            pictures = pictures.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        first = [pictures]
    columns = len(first) + k
    fig = Figure(figsize=(2.2 * columns, 2.4 * b), layout="constrained")
    axes = fig.subplots(b, columns, squeeze=False)
    names = titles(classes[:b, :k], logits[:b], labels)
    for i in range(b):
        row = [("image", first[0][i])] if first else []
        row += list(zip(names[i], tiles[i], strict=True))
        for ax, (title, tile) in zip(axes[i], row, strict=True):
            ax.imshow(tile.permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    if b < count or k < maps:
        fig.suptitle(f"first {b} of {count} images, {k} of {maps} maps each")
    return fig


def preview_html(
    heatmaps: Tensor,
    classes: Tensor,
    logits: Tensor,
    *,
    colormap: str = "jet",
    max_images: int = MAX_IMAGES,
    max_maps: int = PREVIEW_MAPS,
    tile: int = PREVIEW_TILE,
) -> str:
    """A line on the result and, for 2-D maps, a contact sheet of the coloured heatmaps (one
    row per image, titled as :func:`titles`) as an inline PNG, each map scaled to at most
    ``tile`` pixels: the output stays small whatever the batch."""
    count, maps = heatmaps.shape[:2]
    line = (
        f"CAMResult: {count} images x {maps} maps, heatmaps {tuple(heatmaps.shape)} "
        f"{str(heatmaps.dtype).removeprefix('torch.')} on {heatmaps.device}"
    )
    b, k = min(count, max_images), min(maps, max_maps)
    if heatmaps.ndim != 4:  # volumes: no picture
        return f"<div><p>{html.escape(line)}</p></div>"
    if b < count or k < maps:
        line += f"; the first {b} images and {k} maps each shown"
    shown = heatmaps[:b, :k].detach().cpu().float()
    height, width = shown.shape[-2:]
    scale = tile / max(height, width)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        shown = F.interpolate(shown, size, mode="bilinear", antialias=True).clamp(0, 1)
    sheet = contact_sheet(colorize(shown, colormap), titles(classes[:b, :k], logits[:b]))
    png = BytesIO()
    sheet.save(png, format="PNG")
    data = base64.b64encode(png.getvalue()).decode("ascii")
    return (
        f'<div><p>{html.escape(line)}</p><img src="data:image/png;base64,{data}" '
        'alt="heatmaps"></div>'
    )


def _check(heatmaps: Tensor) -> None:
    if heatmaps.ndim != 4:
        raise ValueError(
            f"show draws 2-D maps (B, K, H, W), got heatmaps of shape {tuple(heatmaps.shape)}"
        )
