"""``cam-engine explain``: heatmaps of image files and folders, written as pictures and arrays.

This module only maps the command line onto a :class:`cam_engine.pipeline.ExplainConfig`; the run
is :func:`cam_engine.pipeline.explain`, or :func:`cam_engine.distributed.explain_dataset` with
``--ray``. The outputs are described in the README and in :mod:`cam_engine.pipeline`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..arguments import (
    COLORMAPS,
    MAX_PIXELS,
    METHODS,
    SAVE_CHOICES,
    add_model_arguments,
    add_run_arguments,
    default_workers,
)

if TYPE_CHECKING:
    import torch

    from .. import pipeline
    from ..engine import CAMEngine
    from ..loading import LoadedModel

HELP = (
    "explain image files and folders: overlays, contact sheets, predictions.csv, heatmaps.npz, "
    "index.html"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and folders (recursive)"
    )
    add_model_arguments(parser)
    parser.add_argument("--labels", type=Path, help="class names, one per line (line i = class i)")
    parser.add_argument("--method", default="gradcam", help=f"one of {', '.join(METHODS)}")
    parser.add_argument(
        "--targets",
        default="top1",
        help="classes to explain per image: topK, bottomK or class ids (207,282)",
    )
    add_run_arguments(
        parser,
        layer_help="module or FX node name (default: last feature map)",
        batch_help="images per engine call",
        batch_size=16,
        size_help="H,W (or HxW, or S) the images are resized to for the model (aspect not "
        "kept) (default: the weights' crop size, else 224)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="image decoding threads (default: one per CPU, at most 4)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the model up to the target layer through torch.compile (the first batch "
        "compiles, which takes seconds to minutes; measured 1.07x the eager images/s of "
        "resnet50 on a CPU, 1.0x for vgg16)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feed the model channels-last images up to the target layer (default: on a CPU "
        "only, where it measured 1.02x to 1.53x the images/s of torchvision's CNNs)",
    )
    parser.add_argument(
        "--mean", help="3 normalisation means (default: the weights' or ImageNet's)"
    )
    parser.add_argument("--std", help="3 normalisation stds (default: the weights' or ImageNet's)")
    parser.add_argument("--colormap", default="jet", help=f"one of {', '.join(COLORMAPS)}")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the colour overlay")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/explain"),
        help="output folder (never read as input); a rerun of the same command skips the "
        "images already done there",
    )
    parser.add_argument(
        "--save",
        default=",".join(SAVE_CHOICES),
        help=f"comma-separated, of {','.join(SAVE_CHOICES)} (html: index.html, the gallery; "
        "predictions.csv is always written)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help="skip images with more pixels, read from the file's header before decoding "
        "(decompression bombs; Pillow's limit)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the outputs that --out holds from other settings, instead of refusing; "
        "a rerun with the same settings resumes without it",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help='explain on a Ray cluster (pip install "cam-engine[ray]"): auto, host:6379 or '
        "ray://host:10001; bare --ray (after the images) starts a local one; npz means heatmaps "
        "in Parquet shards",
    )
    parser.add_argument(
        "--actors",
        type=int,
        help="with --ray: model replicas (default: one per GPU of the cluster, else one per CPU)",
    )


def config(args: argparse.Namespace) -> pipeline.ExplainConfig:
    """The :class:`~cam_engine.pipeline.ExplainConfig` of parsed ``explain`` arguments."""
    from .. import pipeline

    given = vars(args)
    names = [name for name in pipeline.ExplainConfig.names() if name in given]
    return pipeline.ExplainConfig(**{name: given[name] for name in names})


def load(args: argparse.Namespace, device: torch.device) -> tuple[LoadedModel, CAMEngine]:
    """The model and engine that ``explain`` would run with these arguments, on ``device``."""
    from .. import pipeline

    return pipeline.load(config(args), device)


def run(args: argparse.Namespace) -> int:
    """0, or 1 when no image could be explained."""
    from .. import pipeline

    settings = config(args)
    if settings.ray is None:
        return 0 if pipeline.explain(settings).explained else 1
    try:
        from ..distributed import explain_dataset  # Ray is an optional extra
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    return 0 if explain_dataset(settings).explained else 1
