"""CPU time per image of the explain job and of the engine alone, on the same JPEG files.

On a machine shared with other jobs the wall-clock images/s of ``cam-engine bench --backends
pipeline`` says more about the neighbours than about the job; the CPU time this process and its
decoding processes spend per image does not depend on them as much. This prints both, for each
of ``--rounds`` rounds (after one warm-up)::

    python scripts/explain_cpu_time.py --model resnet18 --size 480x640 --images 16 --batch-size 8

The ratio engine / job of the CPU times is what the job's images/s would be against the
engine's on an idle machine where both keep every core busy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cam_engine.bench.models import ModelSpec, build_model
from cam_engine.bench.pipeline import write_photos
from cam_engine.engine import CAMEngine
from cam_engine.io import ImageFolder, collate
from cam_engine.loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, size_pair
from cam_engine.pipeline import ExplainConfig, explain, explain_batch


def _cpu_s() -> float:
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", default="224x224", help="H,W of the JPEG files")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workers", type=int, default=2, help="the job's decoding processes")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="explain-cpu-"))
    try:
        paths = write_photos(root / "photos", args.images, size_pair(args.size))
        model = build_model(ModelSpec(args.model, 224))
        loaded = LoadedModel(model, (224, 224), IMAGENET_MEAN, IMAGENET_STD, None, args.model)
        engine = CAMEngine(model, None, "gradcam", input_size=(224, 224))
        config = ExplainConfig(
            [root / "photos"], args.model, out=root / "out", batch_size=args.batch_size,
            workers=args.workers, overwrite=True,
        )  # fmt: skip
        decoded = ImageFolder(paths, (224, 224))
        batches = [
            collate([decoded[i] for i in range(start, min(start + args.batch_size, len(paths)))])
            for start in range(0, len(paths), args.batch_size)
        ]

        def engine_alone() -> None:
            for batch in batches:
                explain_batch(engine, loaded, batch, config.targets)

        def job() -> None:
            shutil.rmtree(root / "out", ignore_errors=True)
            with contextlib.redirect_stderr(io.StringIO()):
                explain(config, model=(loaded, engine))

        engine_alone(), job()  # warm-up
        for _ in range(args.rounds):
            per_image = {}
            for name, call in (("engine alone", engine_alone), ("explain job", job)):
                wall, cpu = time.perf_counter(), _cpu_s()
                call()
                wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
                per_image[name] = cpu * 1000 / len(paths)
                print(
                    f"{name}: {len(paths) / wall:.1f} images/s, "
                    f"{per_image[name]:.1f} CPU ms per image"
                )
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"engine / job (CPU): {per_image['engine alone'] / per_image['explain job']:.2f}x"
                f", load average {load}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
