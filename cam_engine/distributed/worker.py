"""What runs on the Ray workers: decoding (stateless tasks) and explaining (an actor pool).

Both are the code of ``cam-engine explain``: :class:`cam_engine.io.ImageFolder` decodes and
resizes, :func:`cam_engine.pipeline.explain_images` runs the engine (image by image when a batch
fails) and makes the heatmaps, :func:`cam_engine.pipeline.pictures` the pictures.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io import MAX_PIXELS, Batch, ImageFolder
from ..pipeline import ExplainConfig, explain_images, load, output_name, pictures
from .store import Store

__all__ = ["decode", "Explainer"]


def decode(
    batch: dict[str, np.ndarray], size: tuple[int, int], max_pixels: int = MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Decode image files as ``cam-engine explain`` does; unreadable ones keep a reason.

    Args:
        batch: N rows: ``path``, ``key`` (bytes, :func:`os.fsencode`: names need not be UTF-8).
        size: (S_h, S_w) the model input size.
        max_pixels: larger images are not decoded (see :class:`~cam_engine.io.ImageFolder`).

    Returns:
        Columns of N rows: ``key``; ``input`` (N, 3, S_h, S_w) uint8 (zeros if unreadable);
        ``original`` the bytes of the (3, H, W) uint8 image (empty if unreadable); ``height``,
        ``width``; ``error`` (``""``, or why the file could not be decoded).
    """
    folder = ImageFolder([Path(os.fsdecode(p)) for p in batch["path"]], size, max_pixels)
    samples = [folder[i] for i in range(len(folder))]
    blank = torch.zeros(3, *size, dtype=torch.uint8)
    empty = torch.zeros(3, 0, 0, dtype=torch.uint8)
    inputs = [blank if s.input is None else s.input for s in samples]
    originals = [empty if s.original is None else s.original for s in samples]
    return {
        "key": batch["key"],
        "input": torch.stack(inputs).numpy(),
        "original": np.array([o.numpy().tobytes() for o in originals], dtype=object),
        "height": np.array([o.shape[1] for o in originals]),
        "width": np.array([o.shape[2] for o in originals]),
        "error": np.array([s.error or "" for s in samples], dtype=object),
    }


class Explainer:
    """The callable class of Ray Data's actor pool: one model and engine per actor, loaded once.

    Each call explains one decoded batch (see :func:`decode`), writes its pictures and then
    commits its shard (:meth:`Store.write_batch`), and returns only ``image`` and ``ok`` columns:
    the heatmaps never travel back to the driver.

    Args:
        config: the run's settings, with paths the workers can open.
        device: ``"cpu"`` or ``"cuda"`` (the GPU that Ray gave this actor).
        state: the driver's ``state_dict`` of the model: every actor runs the same weights,
            even a model that is randomly initialised when built (``None``: the actor's own).
    """

    def __init__(
        self, config: ExplainConfig, device: str, state: dict[str, torch.Tensor] | None
    ) -> None:
        self.loaded, self.engine = load(config, torch.device(device), state)
        self.config = config
        self.store = Store(config.out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Explain and write a batch of N rows from :func:`decode`.

        Returns:
            ``image`` (N,) output names (:func:`~cam_engine.pipeline.output_name`) and ``ok``
            (N,) bool: False where the image is recorded as unreadable (or failed alone in the
            engine).
        """
        keys = [os.fsdecode(key) for key in batch["key"]]
        failures = [(key, str(e)) for key, e in zip(keys, batch["error"], strict=True) if e]
        good = [i for i, e in enumerate(batch["error"]) if not e]
        results = []
        if good:
            originals = [
                torch.from_numpy(
                    np.frombuffer(batch["original"][i], np.uint8)
                    .reshape(3, int(batch["height"][i]), int(batch["width"][i]))
                    .copy()
                )
                for i in good
            ]
            inputs = torch.from_numpy(batch["input"][good])
            results, failed = explain_images(
                self.engine, self.loaded, Batch(good, originals, inputs), keys, self.config
            )
            failures += failed
            for result in results:  # write errors (disk full) are fatal, not recorded
                self.store.write_pictures(pictures(result, self.config.save))
        self.store.write_batch(results, failures)
        bad = {key for key, _ in failures}
        names = [output_name(key) for key in keys]
        return {"image": np.array(names), "ok": np.array([key not in bad for key in keys])}
