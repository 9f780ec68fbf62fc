"""What runs on the Ray workers: decoding (stateless tasks) and explaining (an actor pool).

Both are the code of ``cam-engine explain``: :class:`cam_engine.io.ImageFolder` decodes and
resizes, :func:`~cam_engine.commands.explain.explain_batch` runs the engine,
:func:`~cam_engine.commands.explain.original_size_maps` and
:func:`~cam_engine.commands.explain.pictures` make the heatmaps and pictures.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..commands import explain
from ..io import Batch, ImageFolder
from .store import Explained, Store

__all__ = ["decode", "Explainer"]


def decode(batch: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Decode image files as ``cam-engine explain`` does; unreadable ones keep a reason.

    Args:
        batch: N rows: ``path`` (str), ``key`` (str).
        size: (S_h, S_w) the model input size.

    Returns:
        Columns of N rows: ``key``; ``input`` (N, 3, S_h, S_w) uint8 (zeros if unreadable);
        ``original`` the bytes of the (3, H, W) uint8 image (empty if unreadable); ``height``,
        ``width``; ``error`` (``""``, or why the file could not be decoded).
    """
    folder = ImageFolder([Path(p) for p in batch["path"]], size)
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
        args: the ``cam-engine explain`` arguments, with paths the workers can open.
        device: ``"cpu"`` or ``"cuda"`` (the GPU that Ray gave this actor).
        state: the driver's ``state_dict`` of the model: every actor runs the same weights,
            even a model that is randomly initialised when built (``None``: the actor's own).
    """

    def __init__(
        self, args: argparse.Namespace, device: str, state: dict[str, torch.Tensor] | None
    ) -> None:
        self.loaded, self.engine = explain.load(args, torch.device(device), state)
        self.targets = explain.parse_targets(args.targets)
        self.save = explain.parse_save(args.save)
        self.colormap = args.colormap if self.save & {"png", "sheet"} else None
        self.alpha = args.alpha
        self.store = Store(args.out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Explain and write a batch of N rows from :func:`decode`.

        Returns:
            ``image`` (N,) keys and ``ok`` (N,) bool: False where the image is recorded as
            unreadable (or failed alone in the engine).
        """
        keys = [str(key) for key in batch["key"]]
        failures = [(key, str(e)) for key, e in zip(keys, batch["error"], strict=True) if e]
        good = [i for i, e in enumerate(batch["error"]) if not e]
        results: list[Explained] = []
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
            explained, failed = self._isolated(Batch(good, originals, inputs), keys)
            failures += failed
            for result, found in explained:  # write errors (disk full) are fatal, not recorded
                self.store.write_pictures(found)
                results.append(result)
        self.store.write_batch(results, failures)
        bad = {key for key, _ in failures}
        return {"image": np.array(keys), "ok": np.array([key not in bad for key in keys])}

    def _isolated(self, batch: Batch, keys: list[str]) -> tuple[list, list[tuple[str, str]]]:
        """:meth:`_explain`, and if the batch fails, one image at a time: only the images
        that fail alone are recorded, as (key, reason)."""
        try:
            return self._explain(batch, keys), []
        except Exception as exc:  # e.g. out of memory on one huge image: not the others' fault
            if len(batch.indices) == 1:
                return [], [(keys[batch.indices[0]], f"{type(exc).__name__}: {exc}")]
        explained, failures = [], []
        for i, index in enumerate(batch.indices):
            done, failed = self._isolated(
                Batch([index], [batch.originals[i]], batch.inputs[i : i + 1]), keys
            )
            explained += done
            failures += failed
        return explained, failures

    def _explain(self, batch: Batch, keys: list[str]) -> list[tuple[Explained, Iterator]]:
        """The results of a batch (rows ``batch.indices`` of ``keys``), each with its
        pictures (rendered when iterated; none without ``png`` / ``sheet``)."""
        cams, classes, scores = explain.explain_batch(self.engine, self.loaded, batch, self.targets)
        classes, scores = classes.tolist(), scores.tolist()
        explained = []
        maps = explain.original_size_maps(batch, cams, self.colormap, self.alpha)
        for row, heat, overlays in maps:
            key, image = keys[batch.indices[row]], batch.originals[row]
            names = [self.loaded.class_name(c) for c in classes[row]]
            found = iter(())
            if overlays is not None:
                found = explain.pictures(
                    key, image, overlays, classes[row], names, scores[row], self.save
                )
            kept = heat.numpy() if "npz" in self.save else None
            result = Explained(key, classes[row], names, scores[row], tuple(image.shape[1:]), kept)
            explained.append((result, found))
        return explained
