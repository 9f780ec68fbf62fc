"""The driver: plan the work, run it on Ray Data, consolidate the outputs.

The pipeline is Ray Data's batch-inference pattern::

    from_items(paths not done yet) -> map_batches(decode)  [tasks]
                                   -> map_batches(Explainer) [actor pool, 1 GPU per actor on GPUs]

On a CPU-only cluster Ray fuses the two stages, so each actor decodes its own batches.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from ..commands import explain
from ..io import Batch, find_images, image_keys
from .store import Store
from .worker import Explainer, decode

__all__ = ["Summary", "explain_dataset", "run"]

#: the settings that shape the outputs: a rerun into the same folder must repeat them
JOB_SETTINGS = (
    "model", "weights", "labels", "num_classes", "target_layer", "method", "targets",
    "input_size", "mean", "std", "colormap", "alpha", "save",
)  # fmt: skip


@dataclass
class Summary:
    """What a run left in its output folder.

    Attributes:
        images: the inputs' images.
        explained: how many of them have heatmaps in the folder (this run's and earlier runs').
        skipped: (key, reason) of the images that could not be decoded or explained.
        attempted: images this run processed (the others were done by an earlier run).
        seconds: wall-clock time of this run: model check, Ray start, actors, explaining.
    """

    images: int
    explained: int
    skipped: list[tuple[str, str]]
    attempted: int
    seconds: float


def explain_dataset(
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    model: str,
    *,
    ray_address: str = "local",
    **options: object,
) -> Summary:
    """Explain image files and folders on Ray, as ``cam-engine explain ... --ray`` does.

    Args:
        images: image files and folders (on a cluster: paths that every node can read).
        out: the output folder (on a cluster: a shared filesystem every node writes to).
        model: as ``--model``: a torchvision name, a model file, or ``module:function``.
        ray_address: ``"local"`` starts a local Ray instance; ``"auto"``, ``"host:6379"``,
            ``"ray://host:10001"`` join a cluster. A Ray already initialised by the caller
            (``ray.init(...)``) is used as it is.
        options: the other options of ``cam-engine explain`` by their Python names, with their
            command-line values: ``weights="DEFAULT"``, ``method="cam"``, ``targets="top2"``,
            ``input_size="64"``, ``mean="0,0,0"``, ``save="png,npz"``, ``batch_size=64``,
            ``actors=4``, ``device="cuda"``.

    Returns:
        The :class:`Summary`; the outputs are in ``out`` (see :mod:`.store`).
    """
    parser = argparse.ArgumentParser(prog="explain_dataset")
    explain.add_arguments(parser)
    args = parser.parse_args([*map(str, images), "--model", model, "--out", str(out)])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown options {unknown}; see `cam-engine explain --help`")
    vars(args).update(options, ray=ray_address)
    explain.check_args(args)
    return _run(args)


def run(args: argparse.Namespace) -> int:
    """``cam-engine explain --ray``: 0, or 1 when no image could be explained."""
    return 0 if _run(args).explained else 1


def _run(args: argparse.Namespace) -> Summary:
    args = _portable(args)
    paths = find_images(args.images)
    keys = image_keys(paths)
    store = Store(args.out)
    store.check_job({name: getattr(args, name) for name in JOB_SETTINGS})
    store.clear_temp()
    finished = store.finished()
    pending = [(str(p), k) for p, k in zip(paths, keys, strict=True) if k not in finished]
    print(
        f"{len(keys) - len(pending)} of {len(keys)} images already done in {args.out}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    if pending:
        input_size, state = _check_model(args)
        started = _connect(args.ray)
        try:
            _execute(args, pending, input_size, state)
        finally:
            if started:
                ray.shutdown()
    seconds = time.perf_counter() - start
    explained, skipped = store.consolidate(keys)
    store.clear_temp()
    summary = Summary(len(keys), explained, skipped, len(pending), seconds)
    _report(summary, args.out)
    return summary


def _portable(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments with every path absolute (workers run elsewhere), without ``run``."""
    values = {name: value for name, value in vars(args).items() if name != "run"}
    values["images"] = [str(Path(p).absolute()) for p in args.images]
    values["out"] = Path(args.out).absolute()
    values["labels"] = str(Path(args.labels).absolute()) if args.labels else None
    values["weights"] = _absolute(args.weights)
    values["model"] = _absolute(args.model)
    values["save"] = ",".join(sorted(explain.parse_save(args.save)))
    return argparse.Namespace(**values)


def _absolute(spec: str | None) -> str | None:
    """An existing file (or the file of ``file.py:function``) as an absolute path."""
    if spec is None:
        return None
    path, sep, function = spec.rpartition(".py:")
    if sep and Path(path + ".py").is_file():
        return f"{Path(path + '.py').absolute()}:{function}"
    return str(Path(spec).absolute()) if Path(spec).is_file() else spec


def _check_model(args: argparse.Namespace) -> tuple[tuple[int, int], dict[str, torch.Tensor]]:
    """Load the model here once, on the CPU, and explain a blank image with it, so that a
    wrong layer, method or target fails now and not in every actor.

    Returns:
        The input size (H, W), and the model's ``state_dict`` for the actors.
    """
    loaded, engine = explain.load(args, torch.device("cpu"))
    blank = torch.zeros(1, 3, *loaded.input_size, dtype=torch.uint8)
    explain.explain_batch(
        engine, loaded, Batch([0], [blank[0]], blank), explain.parse_targets(args.targets)
    )
    print(
        f"explaining with {loaded.source} at {engine.target_layer!r} ({args.method}, "
        f"{engine.split_kind} split, input {loaded.input_size[0]}x{loaded.input_size[1]}) "
        f"on Ray -> {args.out}",
        file=sys.stderr,
    )
    return loaded.input_size, loaded.model.state_dict()


def _connect(address: str) -> bool:
    """Join a Ray cluster, or start a new one for ``"local"`` (never a leftover
    ``/tmp/ray/ray_current_cluster``); ``False`` if this process had already joined one."""
    if ray.is_initialized():
        return False
    ray.init(address=address)
    return True


def _placement(args: argparse.Namespace) -> tuple[str, dict[str, float], int]:
    """(device of the actors, their Ray resources, how many) from ``--device`` / ``--actors``."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    device = torch.device(args.device or ("cuda" if gpus >= 1 else "cpu")).type
    if device == "cuda" and gpus < 1:
        raise ValueError("--device cuda: the Ray cluster has no GPU (see `ray status`)")
    needs = {"num_gpus": 1} if device == "cuda" else {}
    default = gpus if device == "cuda" else resources.get("CPU", 1)
    return device, needs, args.actors or max(1, int(default))


def _execute(
    args: argparse.Namespace,
    pending: list[tuple[str, str]],
    size: tuple[int, int],
    state: dict[str, torch.Tensor],
) -> None:
    """Run the pipeline over the ``pending`` (path, key) pairs; the actors write the outputs."""
    device, needs, actors = _placement(args)
    blocks = math.ceil(len(pending) / args.batch_size)
    actors = min(actors, blocks)  # an actor without a batch would only load the model
    print(f"{len(pending)} images to explain, {actors} actors on {device}", file=sys.stderr)
    data = ray.data.from_items(
        [{"path": path, "key": key} for path, key in pending], override_num_blocks=blocks
    )
    data = data.map_batches(
        decode, fn_kwargs={"size": size}, batch_size=args.batch_size, batch_format="numpy"
    )
    data = data.map_batches(
        Explainer,
        fn_constructor_kwargs={"args": args, "device": device, "state": state},
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **needs,
    )
    for _ in data.iter_batches(batch_size=None):
        pass  # the actors wrote the outputs; this only drives the pipeline


def _report(summary: Summary, out: Path) -> None:
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
