"""An explain run: :func:`run_job` is the frame of every run (lock, settings, resume, tables),
:func:`explain` runs it in this process (decoding on threads, batch by batch)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arguments import default_workers
from ..engine import CAMEngine
from ..io import ImageFolder, decoded_batches, find_images, image_keys
from ..loading import LoadedModel, resolve_device
from .compute import Explained, explain_images, load
from .config import ExplainConfig
from .folder import OutputFolder
from .gallery import update_gallery
from .outputs import output_name, pictures
from .parts import Parts

__all__ = ["Summary", "explain", "report", "run_job"]


@dataclass
class Summary:
    """What a run left in its output folder.

    Attributes:
        images: the inputs' images.
        explained: how many of them have heatmaps in the folder (this run's and earlier runs').
        skipped: (key, reason) of the images that could not be decoded or explained.
        attempted: images this run processed (the others were done by an earlier run).
        seconds: wall-clock time of this run's explaining.
    """

    images: int
    explained: int
    skipped: list[tuple[str, str]]
    attempted: int
    seconds: float


def run_job(
    config: ExplainConfig,
    folder: OutputFolder,
    execute: Callable[[list[Path], list[str]], None],
) -> Summary:
    """A run into ``folder``: take its lock, check its settings, explain the images not done
    yet with ``execute(paths, keys)``, which commits them to ``folder``, and write the tables.

    Never reads ``config.out`` as input. A full disk raises one ``ValueError``.

    Returns:
        The :class:`Summary`, also printed on stderr.
    """
    paths = find_images(config.images, exclude=[config.out])
    keys = image_keys(paths)
    with folder.locked(), folder.disk_full_is_fatal():
        folder.start(config.settings(), config.overwrite)
        finished = folder.finished()
        pending = [i for i, key in enumerate(keys) if output_name(key) not in finished]
        if len(pending) < len(keys):  # a resumed run says what it skips
            done = len(keys) - len(pending)
            print(f"{done} of {len(keys)} images already done in {config.out}", file=sys.stderr)
        start = time.perf_counter()
        if pending:
            execute([paths[i] for i in pending], [keys[i] for i in pending])
        seconds = time.perf_counter() - start
        explained, skipped = folder.consolidate(keys)
        update_gallery(folder, config)
        folder.clear_temp()
    summary = Summary(len(keys), explained, skipped, len(pending), seconds)
    report(summary, config.out)
    return summary


def explain(config: ExplainConfig, model: tuple[LoadedModel, CAMEngine] | None = None) -> Summary:
    """Explain ``config.images`` into ``config.out`` in this process (``cam-engine explain``).

    Resumable: a run killed at any point leaves whole files only, and its rerun explains the
    images not done yet (see :mod:`.parts`).

    Args:
        config: the run's settings.
        model: the model and engine to run, as :func:`~cam_engine.pipeline.load` gives them
            for ``config`` (``None``: loaded here); the benchmark reuses one across runs.

    Returns:
        The :class:`Summary`, also printed on stderr.
    """
    if config.ray is not None:
        raise ValueError("config.ray is set: run it with cam_engine.distributed.explain_dataset")
    device = resolve_device(config.device)
    with closing(Parts(config.out, npz="npz" in config.save)) as folder:
        return run_job(
            config, folder, lambda paths, keys: _run(config, device, folder, paths, keys, model)
        )


def _run(
    config: ExplainConfig,
    device: torch.device,
    folder: Parts,
    paths: list[Path],
    keys: list[str],
    model: tuple[LoadedModel, CAMEngine] | None,
) -> None:
    loaded, engine = load(config, device) if model is None else model
    split = f"{engine.split_kind} split" + (", trunk compiled" if config.compile else "")
    if engine.cam_model.current().channels_last:
        split += ", channels-last input"
    height, width = loaded.input_size
    print(
        f"explaining {len(paths)} images with {loaded.source} at {engine.target_layer!r} "
        f"({config.method}, {split}, input {height}x{width}) on {device} -> {config.out}",
        file=sys.stderr,
    )
    with ExitStack() as stack:
        writer = _Writer(folder, config.save, stack)
        bar = stack.enter_context(tqdm(total=len(paths), unit="img", desc="explain"))
        images = ImageFolder(paths, loaded.input_size, config.max_pixels)
        batches = stack.enter_context(  # closed on a failure too: its threads stop
            closing(
                decoded_batches(
                    images, config.batch_size, config.workers, pin_memory=device.type == "cuda"
                )
            )
        )
        for batch in batches:
            failures = [(keys[i], reason) for i, reason in batch.skipped]
            results: list[Explained] = []
            if batch.inputs is not None:
                results, failed = explain_images(engine, loaded, batch, keys, config)
                failures += failed
            writer.write(results, failures)
            bar.update(len(batch.indices) + len(batch.skipped))
        writer.finish()


class _Writer:
    """Writes the pictures of each batch on a few threads (PIL, NumPy and the deflate release the
    GIL, so they overlap the next batches' decoding and model), and commits each batch once its
    pictures are written, in order, on one more thread: the commit's ``fsync`` waits for the
    disk, and the engine need not wait with it."""

    def __init__(self, folder: Parts, save: frozenset[str], stack: ExitStack) -> None:
        self.folder, self.save = folder, save
        threads = max(1, default_workers())
        self.pool = stack.enter_context(ThreadPoolExecutor(threads, "cam-engine-png"))
        self.committer = stack.enter_context(ThreadPoolExecutor(1, "cam-engine-commit"))
        self.pending: deque[Future] = deque()
        self.max_pending = 4 * threads  # batches: bounds the overlays and maps held in memory

    def write(self, results: list[Explained], failures: list[tuple[str, str]]) -> None:
        """Write a batch's pictures, then commit it: its results and (key, reason) failures.

        Raises the first failure of an earlier batch's pictures or commit."""
        found = [
            self.pool.submit(self.folder.write_pictures, pictures(result, self.save))
            for result in results
        ]
        self.pending.append(self.committer.submit(self._commit, found, results, failures))
        while self.pending and (len(self.pending) > self.max_pending or self.pending[0].done()):
            self.pending.popleft().result()

    def finish(self) -> None:
        """Wait for every batch's commit; the first failure is raised."""
        while self.pending:
            self.pending.popleft().result()

    def _commit(
        self, found: list[Future], results: list[Explained], failures: list[tuple[str, str]]
    ) -> None:
        for future in found:
            future.result()
        self.folder.write_batch(results, failures)


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
