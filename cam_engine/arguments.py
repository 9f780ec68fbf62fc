"""The command line's shared options, and the names its help lists, without torch.

Every command's ``--help`` is built from this module and the command's own, and neither imports
torch: ``cam-engine explain --help`` loads no torch (``tests/test_cli.py`` checks it in a fresh
interpreter). :func:`add_model_arguments` and :func:`add_run_arguments` give every command the
same option names; :func:`size_pair` reads an input size.

The lists below are what the help shows: the library's own registries need torch, so these are
copies, and ``tests/test_cli.py`` checks that each equals the library's (a method, colour map or
benchmark backend added there must be named here too).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence

__all__ = [
    "AUTOCAST",
    "BENCH_BACKENDS",
    "COLORMAPS",
    "COMPILE_MODES",
    "DETECTORS",
    "MAX_PIXELS",
    "METHODS",
    "SAVE_CHOICES",
    "add_model_arguments",
    "add_run_arguments",
    "default_workers",
    "parse_input_size",
    "size_pair",
]

#: images with more pixels are not decoded by default: Pillow's ``Image.MAX_IMAGE_PIXELS``
MAX_PIXELS = 89_478_485
#: what ``cam-engine explain --save`` can write besides ``predictions.csv``
SAVE_CHOICES = ("png", "sheet", "npz", "html")
#: :func:`cam_engine.methods.available`
METHODS = (
    "ablationcam", "cam", "eigencam", "eigengradcam", "fem", "finercam", "fullgrad", "gradcam",
    "gradcam++", "gradcam-elementwise", "guided-backprop", "guided-gradcam", "hirescam", "iscam",
    "kpca-cam", "layercam", "legrad", "randomcam", "refinecam", "scorecam", "segeigencam", "sess",
    "shapleycam", "smoothgradcam++", "sscam", "xgradcam",
)  # fmt: skip
#: :func:`cam_engine.postprocess.available_colormaps`
COLORMAPS = ("gray", "inferno", "jet", "magma", "plasma", "turbo", "viridis")
#: :func:`cam_engine.bench.backends.available`
BENCH_BACKENDS = (
    "plain", "engine", "engine-nchw", "engine-compile", "reference", "pytorch-grad-cam",
    "torchcam", "captum", "ort-plain", "ort-cam", "ov-plain", "ov-cam", "ort-cam-top3",
    "ort-cam-int8", "ort-cam-int8-dynamic",
)  # fmt: skip
#: ``torchvision.models.list_models(module=torchvision.models.detection)``
DETECTORS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fcos_resnet50_fpn",
    "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
)  # fmt: skip
#: the keys of :data:`cam_engine.bench.models.AUTOCAST`
AUTOCAST = ("bf16", "fp16")
#: :data:`cam_engine.bench.models.COMPILE_MODES`
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_workers() -> int:
    """Image decoding threads by default: one per CPU this process may use, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, cpus or 1)


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The options naming a model for :func:`load_model`, the same in every command.

    Adds ``--model``, ``--weights``, ``--num-classes`` and ``--allow-pickle`` (dests ``model``,
    ``weights``, ``num_classes``, ``allow_pickle``) as one group of the help.

    Args:
        parser: the command's parser.
        required: ``False`` for a command that also takes the model another way (``export``'s
            positional MODEL); it must then check that one of them was given.
    """
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=required,
        help="a torchvision classifier name (resnet50, convnext_tiny, vit_b_16, ...); a file "
        "saved with torch.save(model) (needs --allow-pickle); or module:function / "
        "file.py:function returning a model",
    )
    group.add_argument(
        "--weights",
        help="DEFAULT or a weights name of the torchvision model (IMAGENET1K_V2), or a "
        "state_dict file; default: none (RANDOM weights for a torchvision name)",
    )
    group.add_argument(
        "--num-classes", type=int, help="outputs of a torchvision model + state_dict"
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle a --model file saved with torch.save(model); unpickling runs any code "
        "the file holds: trusted files only (--weights files are never unpickled)",
    )


def size_pair(value: str | int | Sequence[int]) -> tuple[int, int]:
    """An input size: ``"H,W"``, ``"HxW"``, ``"S"`` (square), ``S`` or ``(H, W)`` -> ``(H, W)``.

    Raises:
        ValueError: anything else, or a side below 1.
    """
    if isinstance(value, str):
        parts = re.split(r"[,x]", value.strip())
    else:
        parts = [value] if isinstance(value, int) else list(value)
    try:
        size = tuple(int(p) if isinstance(p, str) else p for p in parts)
    except ValueError:
        size = ()
    size = size * 2 if len(size) == 1 else size
    valid = all(isinstance(n, int) and not isinstance(n, bool) for n in size)
    if len(size) != 2 or not valid or min(size) < 1:
        raise ValueError(f"expected H,W or HxW or S (positive), got {value!r}")
    return size


def parse_input_size(text: str) -> tuple[int, int]:
    """``--input-size``'s argparse type: :func:`size_pair` of the text."""
    try:
        return size_pair(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    layer_help: str,
    size_help: str,
    batch_help: str | None = None,
    batch_size: int | None = None,
) -> None:
    """``--target-layer``, ``--batch-size`` and ``--input-size``, spelled alike in every command.

    The older spellings of ``bench`` and ``profile`` (``--layer``, ``--batch``, ``--size``) are
    aliases; the dests are ``target_layer``, ``batch_size`` and ``input_size`` (``(H, W)``, see
    :func:`parse_input_size`).

    Args:
        parser: the command's parser.
        layer_help, size_help: the options' help, which says what their defaults are.
        batch_help: ``--batch-size``'s help; ``None`` for a command without the option.
        batch_size: the default of ``--batch-size``.
    """
    parser.add_argument("--target-layer", "--layer", help=layer_help)
    if batch_help is not None:
        parser.add_argument(
            "--batch-size", "--batch", type=int, default=batch_size, help=batch_help
        )
    parser.add_argument(
        "--input-size", "--size", type=parse_input_size, metavar="H,W", help=size_help
    )
