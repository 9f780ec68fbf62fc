"""``cam-engine export``: write an ONNX model that outputs logits, classes and heatmaps."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import torch
import torchvision
from torch import nn

HELP = "export a classifier to ONNX with its CAM / Grad-CAM heatmaps computed inside the graph"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a torchvision classifier name, or a .pt file (whole module)")
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--weights", default=None, help="torchvision weights (e.g. DEFAULT)")
    parser.add_argument("--target-layer", default=None, help="module name; default: last map")
    parser.add_argument("--method", choices=("cam", "gradcam"), default="cam")
    parser.add_argument("--topk", type=int, default=1, help="classes explained per image")
    parser.add_argument("--input-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
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


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """A torchvision classifier by name, or a whole module saved with ``torch.save``."""
    path = Path(spec)
    if path.suffix in (".pt", ".pth"):
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        model = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a whole nn.Module")
        return model.eval()
    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown torchvision classifier {spec!r}{hint}")
    return torchvision.models.get_model(spec, weights=weights).eval()


def run(args: argparse.Namespace) -> int:
    from ..export import to_onnx

    model = load_model(args.model, args.weights)
    result = to_onnx(
        model,
        args.out,
        target_layer=args.target_layer,
        method=args.method,
        topk=args.topk,
        input_size=tuple(args.input_size),
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
