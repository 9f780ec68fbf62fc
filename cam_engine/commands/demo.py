"""``cam-engine demo``: the whole pipeline offline, on the shipped shapes model, in seconds.

The run itself is :mod:`cam_engine.commands.demo_run`, imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "explain the built-in shapes model offline: contact sheets, localisation scores, speed"

#: the methods the demo shows, in this order, when the installed engine has them
PREFERRED_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "eigencam")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated (default: those of {','.join(PREFERRED_METHODS)} that exist)",
    )
    parser.add_argument(
        "--batch-size", "--batch", type=int, default=6, help="images per contact sheet"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--scale", type=int, default=3, help="enlarge the 64 px tiles this much")
    parser.add_argument(
        "--train",
        action="store_true",
        help="retrain the model from scratch (fixed seed) and save it to OUT/shapes_net.pt",
    )
    parser.add_argument("--steps", type=int, default=1000, help="training steps with --train")
    parser.add_argument("--checkpoint", type=Path, help="use this ShapesNet state_dict instead")


def run(args: argparse.Namespace) -> int:
    from .demo_run import run as run_demo

    return run_demo(args, PREFERRED_METHODS)
