"""``cam-engine export``: write an ONNX model that outputs logits, classes and heatmaps."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..arguments import add_model_arguments, add_run_arguments

HELP = "export a classifier to ONNX with its CAM / Grad-CAM heatmaps computed inside the graph"


def normalize_argv(argv: list[str]) -> list[str]:
    """``--input-size H W``, this command's older spelling, as ``--input-size H,W``."""
    out = list(argv)
    for i, word in enumerate(out[:-2]):
        if word == "--input-size" and all(re.fullmatch(r"\d+", w) for w in out[i + 1 : i + 3]):
            out[i + 1 : i + 3] = [f"{out[i + 1]},{out[i + 2]}"]
            break
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "legacy_model", nargs="?", metavar="MODEL", help="the model, as --model (older spelling)"
    )
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    add_model_arguments(parser, required=False)
    add_run_arguments(
        parser,
        layer_help="module name (default: the last feature map)",
        size_help="H,W (or HxW, or S; or H W, the older spelling) of the example input "
        "(default: the weights' crop size, else 224)",
    )
    parser.add_argument(
        "--method", choices=("cam", "gradcam"), default="cam", help="the method in the graph"
    )
    parser.add_argument("--topk", type=int, default=1, help="classes explained per image")
    parser.add_argument("--dynamic-size", action="store_true", help="any input H, W")
    parser.add_argument(
        "--static-batch",
        type=int,
        default=None,
        metavar="B",
        help="fix the batch size (default: dynamic)",
    )
    parser.add_argument(
        "--classes-input",
        action="store_true",
        help="add a (B, K) 'classes' input instead of explaining the top-k",
    )
    parser.add_argument("--colormap", default=None, help="output uint8 overlays in this map")
    parser.add_argument("--fp16", action="store_true", help="float16 trunk and head (GPU)")
    parser.add_argument(
        "--optimized",
        type=Path,
        default=None,
        metavar="PATH",
        help="also save ONNX Runtime's optimised graph there",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the self-check")


def run(args: argparse.Namespace) -> int:
    from ..export import to_onnx
    from ..loading import load_model

    if (args.model is None) == (args.legacy_model is None):
        raise ValueError("name the model once: --model MODEL OUT (or the older MODEL OUT)")
    loaded = load_model(
        args.model or args.legacy_model,
        args.weights,
        input_size=args.input_size,
        num_classes=args.num_classes,
        allow_pickle=args.allow_pickle,
    )
    height, width = loaded.input_size
    print(
        f"exporting {loaded.source} ({args.method}, input {height}x{width}) -> {args.out}",
        file=sys.stderr,
    )
    result = to_onnx(
        loaded.model,
        args.out,
        target_layer=args.target_layer,
        method=args.method,
        topk=args.topk,
        input_size=loaded.input_size,
        mean=loaded.mean,
        std=loaded.std,
        dynamic_batch=args.static_batch is None,
        dynamic_size=args.dynamic_size,
        colormap=args.colormap,
        fp16=args.fp16,
        classes_input=args.classes_input,
        batch_size=args.static_batch or 1,
        check=not args.no_check,
        optimized_path=args.optimized,
    )
    meta = result.metadata
    print(
        f"wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB): {meta['method']} "
        f"at {meta['target_layer']!r}, {meta['head']} head, {meta['exporter']} exporter"
    )
    for kind in ("inputs", "outputs"):
        shapes = ", ".join(f"{n} {tuple(s)}" for n, s in meta[kind].items())
        print(f"  {kind}: {shapes}")
    if result.errors:
        worst = max(result.errors, key=result.errors.get)
        print(
            f"  self-check vs PyTorch engine (ORT CPU): {len(result.errors)} checks, "
            f"largest {worst}: {result.errors[worst]:.2e}"
        )
    if result.optimized_path is not None:
        print(f"  optimised graph: {result.optimized_path}")
    return 0
