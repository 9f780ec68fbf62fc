"""``cam-engine detect``: a torchvision detector's detections, each drawn with its own map.

Every image is resized to ``--input-size`` (aspect not kept), its detections scoring at least
``--score-threshold`` (the best ``--max-detections``) are explained one map each
(:class:`cam_engine.targets.BoxScore` with ``per_box``), and each is written as
``<out>/<image stem>.<k>.png`` (the map over the image, the box and its label drawn), with one
row per detection in ``<out>/detections.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

HELP = "explain a torchvision detector's detections: one overlay per box, detections.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..arguments import DETECTORS, add_run_arguments

    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGES", help="image files")
    parser.add_argument(
        "--model",
        default="fasterrcnn_mobilenet_v3_large_320_fpn",
        help=f"a torchvision detector: {', '.join(DETECTORS)}",
    )
    parser.add_argument(
        "--weights",
        help="DEFAULT or a weights name of the detector; default: none (RANDOM weights)",
    )
    parser.add_argument("--method", default="gradcam", help="a CAM method (cam-engine explain)")
    add_run_arguments(
        parser,
        layer_help="module name (default: the finest FPN level, else the backbone's first map)",
        size_help="H,W (or HxW, or S) the images are resized to (default: 320)",
    )
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="detections scoring less are left out"
    )
    parser.add_argument("--max-detections", type=int, default=5, help="per image, best first")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--colormap", default="jet", help="colour map of the overlays")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the colour overlay")
    parser.add_argument("--out", type=Path, default=Path("out/detect"), help="output folder")


def run(args: argparse.Namespace) -> int:
    """0, or 1 when no image had a detection to explain."""
    import torch
    import torchvision
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.functional import resize
    from torchvision.utils import draw_bounding_boxes

    from ..detection import detector
    from ..engine import CAMEngine
    from ..io import save_png
    from ..loading import resolve_device
    from ..postprocess import overlay
    from ..targets import BoxScore

    if args.max_detections < 1 or not 0 <= args.score_threshold <= 1:
        raise ValueError("--max-detections must be >= 1 and --score-threshold in [0, 1]")
    device = resolve_device(args.device)
    weights = None
    if args.weights is not None:
        weights = torchvision.models.get_model_weights(args.model)[args.weights]
    model = torchvision.models.get_model(
        args.model, weights=weights, **({} if weights else {"weights_backbone": None})
    )
    model = model.eval().to(device)
    # the detector's own threshold: keep what --score-threshold keeps
    for owner in (model, getattr(model, "roi_heads", None)):
        if hasattr(owner, "score_thresh"):
            owner.score_thresh = args.score_threshold
    names = weights.meta["categories"] if weights is not None else None
    engine = CAMEngine(detector(model, args.target_layer), method=args.method)
    size = list(args.input_size or (320, 320))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, explained = [], 0
    for path in args.images:
        picture = resize(decode_image(str(path), mode=ImageReadMode.RGB), size).to(device)
        x = (picture / 255)[None]
        with torch.no_grad():
            found = model(x)[0]
        keep = (found["scores"] >= args.score_threshold).nonzero()[: args.max_detections, 0]
        if len(keep) == 0:
            continue
        boxes, labels, scores = found["boxes"][keep], found["labels"][keep], found["scores"][keep]
        res = engine(x, BoxScore(labels, boxes, per_box=True))
        drawn = overlay(picture[None], res.heatmaps, colormap=args.colormap, alpha=args.alpha)
        for k, (box, label, score) in enumerate(zip(boxes, labels, scores, strict=True)):
            name = names[label] if names else f"class {int(label)}"
            image = draw_bounding_boxes(
                drawn[0, k].cpu(), box[None].cpu(), [f"{name} {float(score):.2f}"], colors="white"
            )
            save_png(args.out / f"{path.stem}.{k}.png", image)
            rows.append([str(path), k, int(label), name, f"{float(score):.4f}"])
            rows[-1] += [f"{float(v):.1f}" for v in box]
        explained += 1
    with open(args.out / "detections.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "k", "class_id", "class_name", "score", "x1", "y1", "x2", "y2"])
        writer.writerows(rows)
    return 0 if explained else 1
