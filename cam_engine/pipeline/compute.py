"""The model side of a run: load the model of a config, explain decoded batches, and bring the
maps back to every image's original size."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..engine import CAMEngine
from ..io import Batch, reason
from ..loading import LoadedModel, load_model
from ..postprocess import heatmaps, overlay, shrink
from .config import ExplainConfig, Targets

__all__ = [
    "SHEET_TILE",
    "Explained",
    "check_model",
    "explain_batch",
    "explain_images",
    "load",
    "original_size_maps",
    "sheet_tiles",
]

#: longest side of a contact-sheet tile; overlays themselves are always at full size
SHEET_TILE = 512


def load(
    config: ExplainConfig, device: torch.device, state: dict[str, Tensor] | None = None
) -> tuple[LoadedModel, CAMEngine]:
    """The model of ``config`` on ``device``, and its engine.

    Args:
        config: the run's settings.
        device: where the model runs.
        state: a ``state_dict`` loaded into the model before the engine is built (so that
            every Ray actor runs the driver's weights, random ones included).
    """
    loaded = load_model(
        config.model,
        config.weights,
        device,
        labels=config.labels,
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
        num_classes=config.num_classes,
        allow_pickle=config.allow_pickle,
    )
    if state is not None:
        loaded.model.load_state_dict(state)
    engine = CAMEngine(
        loaded.model,
        config.target_layer,
        config.method,
        input_size=loaded.input_size,
        compile=config.compile,
        channels_last=config.channels_last,
    )
    return loaded, engine


def explain_batch(
    engine: CAMEngine, loaded: LoadedModel, batch: Batch, targets: Targets
) -> tuple[Tensor, Tensor, Tensor]:
    """(cams (B, K, h, w), classes (B, K), softmax scores (B, K)) of a decoded batch."""
    x = loaded.preprocess(batch.inputs)
    if isinstance(targets, tuple):
        targets = torch.tensor(targets).expand(len(x), -1)
    res = engine(x, targets)
    loaded.check_num_classes(res.logits.shape[1])
    scores = res.logits.float().softmax(1).gather(1, res.classes)
    return res.cams, res.classes, scores


def check_model(engine: CAMEngine, loaded: LoadedModel, targets: Targets) -> None:
    """Explain a blank image, so that a wrong layer, method, target or labels file fails once,
    and not as a failure of every image (:func:`explain_images` records those)."""
    blank = torch.zeros(1, 3, *loaded.input_size, dtype=torch.uint8)
    explain_batch(engine, loaded, Batch([0], [blank[0]], blank), targets)


def original_size_maps(
    batch: Batch, cams: Tensor, colormap: str | None, alpha: float, tiles: bool = False
) -> Iterator[tuple[int, Tensor, Tensor | None, Tensor | None]]:
    """Each image's heatmaps at its original size, its overlays and its contact-sheet tiles.

    Maps of same-size images are upsampled, coloured and scaled to tiles in one call each, on
    the maps' device.

    Args:
        batch: the decoded images (originals at their own sizes).
        cams: (B, K, h, w) maps from the engine.
        colormap: the overlays' colour map, or ``None`` for no overlays (and no tiles).
        alpha: weight of the colour in the overlays.
        tiles: make the tiles too (:func:`sheet_tiles`).

    Yields:
        (row in the batch, heatmaps (K, H, W) float32 in [0, 1] on the CPU, overlays
        (K, 3, H, W) uint8 on the CPU or ``None``, tiles (1 + K, 3, h, w) uint8 on the CPU or
        ``None``), grouped by image size; overlays and tiles are channels-last in memory.
    """
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row, image in enumerate(batch.originals):
        by_size[tuple(image.shape[1:])].append(row)
    for size, rows in by_size.items():
        picked = torch.tensor(rows, device=cams.device)
        maps = heatmaps(cams.index_select(0, picked), size)
        overlays = small = None
        if colormap is not None:
            # stacked channels-last: decoders give (3, H, W) views of (H, W, 3) pixels, so this
            # is a plain copy, and the overlays come out channels-last, the PNG rows' layout
            images = torch.stack([batch.originals[r].permute(1, 2, 0) for r in rows])
            images = images.to(cams.device).permute(0, 3, 1, 2)
            overlays = overlay(images, maps, colormap, alpha)
            small = sheet_tiles(images, overlays).cpu() if tiles else None
            overlays = overlays.cpu()
        maps = maps.float().cpu()
        for i, row in enumerate(rows):
            yield (
                row,
                maps[i],
                None if overlays is None else overlays[i],
                None if small is None else small[i],
            )


def sheet_tiles(images: Tensor, overlays: Tensor) -> Tensor:
    """Images and their overlays scaled down to contact-sheet tiles (:func:`shrink`, longest
    side at most :data:`SHEET_TILE`), batched, on their device.

    Args:
        images: (B, 3, H, W) uint8.
        overlays: (B, K, 3, H, W) uint8 overlays of those images.

    Returns:
        (B, 1 + K, 3, h, w) uint8: each image, then its overlays; channels-last in memory
        (``permute(0, 1, 3, 4, 2)`` is contiguous, the rows of RGB pictures).
    """
    batch, maps = overlays.shape[:2]
    if overlays.shape[2:] != images.shape[1:] or len(images) != batch:
        raise ValueError(
            f"overlays {tuple(overlays.shape)} are not (B, K, 3, H, W) of images "
            f"{tuple(images.shape)}"
        )
    small_images = shrink(images, SHEET_TILE).permute(0, 2, 3, 1)[:, None]
    small_overlays = shrink(overlays.flatten(0, 1), SHEET_TILE).permute(0, 2, 3, 1)
    tiles = torch.cat([small_images, small_overlays.unflatten(0, (batch, maps))], 1)
    return tiles.permute(0, 1, 4, 2, 3)  # (B, 1 + K, h, w, 3) in memory


@dataclass
class Explained:
    """The results of one image.

    Attributes:
        key: the image's key (:func:`cam_engine.io.image_keys`).
        classes, names, scores: the K explained classes, their names, softmax probabilities.
        size: (H, W) of the original image.
        heatmaps: (K, H, W) float32 in [0, 1], or ``None`` when they are not kept.
        image: (3, H, W) uint8 original, for the pictures.
        overlays: (K, 3, H, W) uint8, or ``None`` when no picture is saved.
        tiles: (1 + K, 3, h, w) uint8, the image and its overlays scaled for the contact sheet
            (:func:`sheet_tiles`), or ``None`` (then the sheet scales them itself).
    """

    key: str
    classes: list[int]
    names: list[str]
    scores: list[float]
    size: tuple[int, int]
    heatmaps: np.ndarray | None
    image: Tensor | None = None
    overlays: Tensor | None = None
    tiles: Tensor | None = None


def explain_images(
    engine: CAMEngine,
    loaded: LoadedModel,
    batch: Batch,
    keys: list[str],
    config: ExplainConfig,
) -> tuple[list[Explained], list[tuple[str, str]]]:
    """Explain a decoded batch; if the engine fails on it, check the setup, then redo it image
    by image.

    The setup is checked (:func:`check_model`) only when a batch fails, so that a run whose
    batches succeed explains nothing else: a wrong layer, target or labels file, which fails
    every batch, raises its error at the first one. An image that fails alone (e.g. out of
    memory on one huge image) is recorded; the others are explained. Batch row ``i`` is image
    ``keys[batch.indices[i]]``.

    Returns:
        (the results, in batch order; (key, reason) of the images that failed alone).
    """
    try:
        return _explain(engine, loaded, batch, keys, config), []
    except Exception as exc:  # one image's fault must not cost the others
        check_model(engine, loaded, config.targets)
        if len(batch.indices) == 1:
            return [], [(keys[batch.indices[0]], f"{type(exc).__name__}: {reason(exc)}")]
    explained, failures = [], []
    for i, index in enumerate(batch.indices):
        one = Batch([index], [batch.originals[i]], batch.inputs[i : i + 1])
        try:
            explained += _explain(engine, loaded, one, keys, config)
        except Exception as exc:
            failures.append((keys[index], f"{type(exc).__name__}: {reason(exc)}"))
    return explained, failures


def _explain(
    engine: CAMEngine, loaded: LoadedModel, batch: Batch, keys: list[str], config: ExplainConfig
) -> list[Explained]:
    cams, classes, scores = explain_batch(engine, loaded, batch, config.targets)
    classes, scores = classes.tolist(), scores.tolist()
    colormap = config.colormap if config.save & {"png", "sheet"} else None
    tiles = "sheet" in config.save
    explained: dict[int, Explained] = {}
    for row, maps, overlays, small in original_size_maps(
        batch, cams, colormap, config.alpha, tiles
    ):
        image = batch.originals[row]
        explained[row] = Explained(
            key=keys[batch.indices[row]],
            classes=classes[row],
            names=[loaded.class_name(c) for c in classes[row]],
            scores=scores[row],
            size=tuple(image.shape[1:]),
            heatmaps=maps.numpy() if "npz" in config.save else None,
            image=image,
            overlays=overlays,
            tiles=small,
        )
    return [explained[row] for row in sorted(explained)]
