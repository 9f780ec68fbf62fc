"""The whole ``cam-engine explain`` job against the engine alone, on the same image files.

The job (:func:`cam_engine.pipeline.explain`, every output on) decodes JPEG files on its
decoding threads, preprocesses them, runs the engine, upsamples each map to its image's
original size, draws the overlays and contact sheets and writes the PNG files, the per-batch
parts and the merged ``predictions.csv`` / ``heatmaps.npz``. The engine row runs the same engine
on the same images already decoded and resized (:func:`cam_engine.pipeline.explain_batch`: the
preprocessing, the engine call and the softmax), batch by batch. Both rows are interleaved
rounds of the whole folder, with one model and one engine, so their ratio is what the job adds
to explaining.

The images are synthetic photographs (colour waves and sensor-like noise, so that JPEG and PNG
work as hard as on a photo), written once per size as JPEG files, deterministically.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..arguments import default_workers
from ..engine import CAMEngine
from ..io import ImageFolder, collate
from ..loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel
from ..pipeline import ExplainConfig, explain, explain_batch
from . import backends as bk
from .harness import Measurement, loadavg, time_interleaved
from .models import ModelSpec, build_model

__all__ = ["PHOTO_SIZES", "run_pipeline", "write_photos"]

#: (H, W) of the benchmark's JPEG files: the model's input size, and a 640 x 480 photo
PHOTO_SIZES = ((224, 224), (480, 640))
#: the rows' backend names
JOB, ENGINE = "pipeline", "engine-decoded"


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` JPEG files (quality 90) of ``size`` (H, W) in ``folder``: ``000.jpg``, ...

    Each is a smooth random colour field plus Gaussian noise (sigma 12 of 255), the same for
    the same arguments. Files already there are kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    paths = []
    for i in range(count):
        freq, phase = rng.uniform(1, 6, (3, 2)), rng.uniform(0, 2 * np.pi, (3, 2))
        waves = np.stack(
            [np.sin(2 * np.pi * f[0] * xx + p[0]) * np.cos(2 * np.pi * f[1] * yy + p[1])
             for f, p in zip(freq, phase, strict=True)],
            axis=-1,
        )  # fmt: skip
        noise = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip((waves * 0.4 + 0.5) * 255 + noise, 0, 255).astype(np.uint8)
        path = folder / f"{i:03d}.jpg"
        if not path.exists():
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def run_pipeline(
    spec: ModelSpec,
    batch: int,
    method: str,
    *,
    layer: str | None = None,
    images: int | None = None,
    workers: int | None = None,
    sizes: Sequence[tuple[int, int]] = PHOTO_SIZES,
    warmup: int = 1,
    repeats: int = 5,
    workdir: Path = Path("out/bench"),
    progress: bool = True,
) -> list[Measurement]:
    """Images/s of the explain job and of the engine alone, for JPEG files of each size.

    Args:
        spec: the model (its ``size`` is the model's input size; the CPU or a CUDA device).
        batch: images per engine call (``--batch-size`` of the job).
        method: the CAM method.
        layer: the target layer (``None``: the engine's choice).
        images: JPEG files per size (default ``4 * batch``); one timed call explains them all.
        workers: the job's decoding threads (default: the job's own default).
        sizes: (H, W) of the files.
        warmup: untimed calls of each row first.
        repeats: timed rounds, the two rows interleaved.
        workdir: the photos go to ``workdir/pipeline/photos/HxW/``, the job's outputs to
            ``workdir/pipeline/explain/``; ``workdir/pipeline`` is deleted at the end.

    Returns:
        Two :class:`Measurement` per size, ``pipeline`` and ``engine-decoded``, with
        ``images`` and ``photos`` set.
    """
    count = images or 4 * batch
    model = build_model(spec)
    input_size = (spec.size, spec.size)
    loaded = LoadedModel(model, input_size, IMAGENET_MEAN, IMAGENET_STD, None, spec.name)
    engine = CAMEngine(model, layer, method, input_size=input_size)
    scratch = workdir / "pipeline"
    out = scratch / "explain"
    rows = []
    try:
        for height, width in sizes:
            folder = scratch / "photos" / f"{height}x{width}"
            paths = write_photos(folder, count, (height, width))
            config = ExplainConfig(
                [folder],
                spec.name,
                out=out,
                method=method,
                target_layer=engine.target_layer,
                batch_size=batch,
                input_size=input_size,
                device=spec.device,
                overwrite=True,
                workers=default_workers() if workers is None else workers,
            )
            decoded = ImageFolder(paths, input_size)
            batches = [
                collate([decoded[i] for i in range(start, min(start + batch, count))])
                for start in range(0, count, batch)
            ]

            def engine_alone(_: object, batches=batches, targets=config.targets) -> None:
                for one in batches:
                    explain_batch(engine, loaded, one, targets)

            def job(_: object, config=config) -> None:
                with contextlib.redirect_stderr(io.StringIO()):  # its progress bar and summary
                    explain(config, model=(loaded, engine))

            calls = {
                ENGINE: bk.Prepared(engine_alone),
                # a fresh output folder for every call, outside the timed region
                JOB: bk.Prepared(job, attach=lambda: shutil.rmtree(out, ignore_errors=True)),
            }
            device_tensor = torch.empty(0, device=spec.device)  # what the timer synchronises
            times = time_interleaved(calls, device_tensor, warmup, repeats, progress)
            load = loadavg()
            photos = f"{height}x{width}"
            for name, note in (
                (ENGINE, "the engine alone on the decoded, resized images"),
                (JOB, "cam-engine explain: decode, engine, original-size maps, overlays, PNG, NPZ"),
            ):
                rows.append(
                    Measurement(
                        spec.name, batch, spec.size, spec.device, method, name, times[name],
                        note=note, images=count, photos=photos, load_avg=load,
                    )
                )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows
