"""An explain run in this process: decode in DataLoader workers, explain batch by batch, write."""

from __future__ import annotations

import csv
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..io import ImageFolder, NpzWriter, collate, find_images, image_keys, save_png
from .compute import Explained, check_model, explain_images, load
from .config import ExplainConfig, default_workers
from .outputs import PREDICTION_COLUMNS, pictures, prediction_rows, write_skipped

__all__ = ["Summary", "explain", "report"]


@dataclass
class Summary:
    """What a run left in its output folder.

    Attributes:
        images: the inputs' images.
        explained: how many of them have heatmaps in the folder (this run's and earlier runs').
        skipped: (key, reason) of the images that could not be decoded or explained.
        attempted: images this run processed (the others were done by an earlier run).
        seconds: wall-clock time of this run.
    """

    images: int
    explained: int
    skipped: list[tuple[str, str]]
    attempted: int
    seconds: float


def explain(config: ExplainConfig) -> Summary:
    """Explain ``config.images`` into ``config.out`` in this process (``cam-engine explain``).

    Returns:
        The :class:`Summary`, also printed on stderr.
    """
    if config.ray is not None:
        raise ValueError("config.ray is set: run it with cam_engine.distributed.explain_dataset")
    device = _device(config.device)
    paths = find_images(config.images)
    keys = image_keys(paths)
    loaded, engine = load(config, device)
    check_model(engine, loaded, config.targets)
    split = f"{engine.split_kind} split" + (", trunk compiled" if config.compile else "")
    if engine.model.current().channels_last:
        split += ", channels-last input"
    height, width = loaded.input_size
    print(
        f"explaining {len(paths)} images with {loaded.source} at {engine.target_layer!r} "
        f"({config.method}, {split}, input {height}x{width}) on {device} -> {config.out}",
        file=sys.stderr,
    )
    loader = DataLoader(
        ImageFolder(paths, loaded.input_size),
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    skipped: list[tuple[str, str]] = []
    start = time.perf_counter()
    with ExitStack() as stack:
        writer = _Writer(config, stack)
        bar = stack.enter_context(tqdm(total=len(paths), unit="img", desc="explain"))
        for batch in loader:
            skipped += [(keys[i], reason) for i, reason in batch.skipped]
            if batch.inputs is not None:
                results, failures = explain_images(engine, loaded, batch, keys, config)
                writer.write(results)
                skipped += failures
            bar.update(len(batch.indices) + len(batch.skipped))
    with open(config.out / "skipped.csv", "w", newline="") as file:
        write_skipped(file, skipped)
    summary = Summary(
        len(keys), len(keys) - len(skipped), skipped, len(keys), time.perf_counter() - start
    )
    report(summary, config.out)
    return summary


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Writer:
    """Writes every output of one run; one :meth:`write` call per batch.

    The CSV and the NPZ are written in order on the calling thread; PNGs are encoded on a few
    threads (zlib releases the GIL), overlapping with the next batch's decoding and model.
    """

    def __init__(self, config: ExplainConfig, stack: ExitStack) -> None:
        self.out, self.save = config.out, config.save
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv = csv.writer(
            stack.enter_context(open(self.out / "predictions.csv", "w", newline=""))
        )
        self.csv.writerow(PREDICTION_COLUMNS)
        self.npz = None
        if "npz" in self.save:
            self.npz = stack.enter_context(NpzWriter(self.out / "heatmaps.npz"))
        threads = max(1, default_workers())
        self.pool = stack.enter_context(ThreadPoolExecutor(threads, "cam-engine-png"))
        self.pending: deque[Future] = deque()
        self.max_pending = 4 * threads  # bounds the overlays held in memory
        stack.callback(self.finish)

    def write(self, results: list[Explained]) -> None:
        """Outputs of a batch's images."""
        for result in results:
            self.csv.writerows(
                prediction_rows(result.key, result.classes, result.names, result.scores)
            )
            if self.npz is not None:
                self.npz.add(result.key, result.heatmaps)
            self._submit(pictures(result, self.save))

    def _submit(self, found: Iterator[tuple[str, Tensor | Image.Image]]) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._pictures, found))

    def _pictures(self, found: Iterator[tuple[str, Tensor | Image.Image]]) -> None:
        """Write the overlay PNGs and the contact sheet of one image."""
        for name, picture in found:
            save_png(self.out / name, picture)

    def finish(self) -> None:
        """Wait for the pictures still being written; the first failure is raised."""
        while self.pending:
            self.pending.popleft().result()


def report(summary: Summary, out: Path) -> None:
    """Print the summary of a run on stderr."""
    rate = summary.attempted / max(summary.seconds, 1e-9)
    print(
        f"explained {summary.explained} of {summary.images} images -> {out}; this run: "
        f"{summary.attempted} images in {summary.seconds:.1f} s ({rate:.1f} images/s)",
        file=sys.stderr,
    )
    if summary.skipped:
        print(
            f"skipped {len(summary.skipped)} images (see {out / 'skipped.csv'}):", file=sys.stderr
        )
        for key, reason in summary.skipped[:20]:
            print(f"  {key}: {reason}", file=sys.stderr)
