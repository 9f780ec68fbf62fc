"""The driver: plan the work, run it on Ray Data, consolidate the outputs.

The pipeline is Ray Data's batch-inference pattern::

    from_items(paths not done yet) -> map_batches(decode)  [tasks]
                                   -> map_batches(Explainer) [actor pool, 1 GPU per actor on GPUs]

On a CPU-only cluster Ray fuses the two stages, so each actor decodes its own batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import ray
import torch

from ..pipeline import ExplainConfig, Summary, check_model, load, run_job
from ..pipeline.config import absolute
from .store import Store
from .worker import Explainer, decode

__all__ = ["explain_dataset"]


def explain_dataset(
    images: Sequence[str | os.PathLike] | ExplainConfig,
    out: str | os.PathLike | None = None,
    model: str | None = None,
    *,
    ray_address: str | None = None,
    **options: object,
) -> Summary:
    """Explain image files and folders on Ray, as ``cam-engine explain ... --ray`` does.

    Call it with an :class:`~cam_engine.pipeline.ExplainConfig` (its ``ray`` field, or
    ``ray_address``, says where), or with the config's fields as arguments.

    Args:
        images: image files and folders (on a cluster: paths that every node can read), or the
            whole config.
        out: the output folder (on a cluster: a shared filesystem every node writes to).
        model: as ``--model``: a torchvision name, a model file, or ``module:function``.
        ray_address: ``"local"`` (the default) starts a local Ray instance; ``"auto"``,
            ``"host:6379"``, ``"ray://host:10001"`` join a cluster. A Ray already initialised by
            the caller (``ray.init(...)``) is used as it is.
        options: the other fields of :class:`~cam_engine.pipeline.ExplainConfig`, typed or
            with their command-line values: ``weights="DEFAULT"``, ``method="cam"``,
            ``targets="top2"``, ``input_size="64"``, ``mean="0,0,0"``, ``save="png,npz"``,
            ``batch_size=64``, ``actors=4``, ``device="cuda"``.

    Returns:
        The :class:`~cam_engine.pipeline.Summary`; the outputs are in ``out`` (see :mod:`.store`).
    """
    if isinstance(images, ExplainConfig):
        if out is not None or model is not None or options:
            raise TypeError("explain_dataset(config) takes no other settings")
        config = images
    elif out is None or model is None:
        raise TypeError("explain_dataset needs images, out and model, or a config")
    else:
        config = ExplainConfig(images=images, model=model, out=out, **options)
    config = _portable(dataclasses.replace(config, ray=ray_address or config.ray or "local"))
    return run_job(config, Store(config.out), lambda paths, keys: _on_ray(config, paths, keys))


def _portable(config: ExplainConfig) -> ExplainConfig:
    """The config with every path absolute: the workers run elsewhere."""
    return dataclasses.replace(
        config,
        images=[str(Path(p).absolute()) for p in config.images],
        out=config.out.absolute(),
        labels=absolute(config.labels),
        weights=absolute(config.weights),
        model=absolute(config.model),
    )


def _on_ray(config: ExplainConfig, paths: list[Path], keys: list[str]) -> None:
    """Explain the images on Ray: the actors write their outputs into ``config.out``."""
    input_size, state = _check_model(config)
    started = _connect(config.ray)
    try:
        _execute(config, paths, keys, input_size, state)
    finally:
        if started:
            ray.shutdown()


def _check_model(config: ExplainConfig) -> tuple[tuple[int, int], dict[str, torch.Tensor]]:
    """Load the model here once, on the CPU, and explain a blank image with it, so that a
    wrong layer, method or target fails now and not in every actor.

    Returns:
        The input size (H, W), and the model's ``state_dict`` for the actors.
    """
    loaded, engine = load(config, torch.device("cpu"))
    check_model(engine, loaded, config.targets)
    print(
        f"explaining with {loaded.source} at {engine.target_layer!r} ({config.method}, "
        f"{engine.split_kind} split, input {loaded.input_size[0]}x{loaded.input_size[1]}) "
        f"on Ray -> {config.out}",
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


def _placement(config: ExplainConfig) -> tuple[str, dict[str, float], int]:
    """(device of the actors, their Ray resources, how many) from ``--device`` / ``--actors``."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    device = torch.device(config.device or ("cuda" if gpus >= 1 else "cpu")).type
    if device == "cuda" and gpus < 1:
        raise ValueError("--device cuda: the Ray cluster has no GPU (see `ray status`)")
    needs = {"num_gpus": 1} if device == "cuda" else {}
    default = gpus if device == "cuda" else resources.get("CPU", 1)
    return device, needs, config.actors or max(1, int(default))


def _execute(
    config: ExplainConfig,
    paths: list[Path],
    keys: list[str],
    size: tuple[int, int],
    state: dict[str, torch.Tensor],
) -> None:
    """Run the pipeline over the images; the actors write the outputs."""
    device, needs, actors = _placement(config)
    blocks = math.ceil(len(paths) / config.batch_size)
    actors = min(actors, blocks)  # an actor without a batch would only load the model
    print(f"{len(paths)} images to explain, {actors} actors on {device}", file=sys.stderr)
    items = [  # as bytes: a file name need not be UTF-8, which Arrow's strings must be
        {"path": os.fsencode(path), "key": os.fsencode(key)}
        for path, key in zip(paths, keys, strict=True)
    ]
    data = ray.data.from_items(items, override_num_blocks=blocks)
    data = data.map_batches(
        decode,
        fn_kwargs={"size": size, "max_pixels": config.max_pixels},
        batch_size=config.batch_size,
        batch_format="numpy",
    )
    data = data.map_batches(
        Explainer,
        fn_constructor_kwargs={"config": config, "device": device, "state": state},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **needs,
    )
    for _ in data.iter_batches(batch_size=None):
        pass  # the actors wrote the outputs; this only drives the pipeline
