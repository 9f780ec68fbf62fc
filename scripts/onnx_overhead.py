"""What the exported CAM model costs over the plain ONNX model, node by node, and its int8 error.

    python scripts/onnx_overhead.py                       # resnet50, batch 8, 224 px
    python scripts/onnx_overhead.py --model resnet18 --batch-size 2 --input-size 64 --runs 2

Exports (once, into --workdir, the files the benchmark's ort-* rows use) the plain model, the
CAM model at top-1 and top-3 and the top-1 model's int8 copies, then prints as Markdown:

1. ONNX Runtime's node profile (``SessionOptions.enable_profiling``, CPU provider), the plain
   and CAM files run interleaved: the CAM model's kernel time by stage (trunk, head, CAM, post,
   layout) against the plain model's, and its slowest nodes outside the trunk and head;
2. the int8 maps against the float32 file's (max and mean absolute difference, top-1 class
   agreement) on the timed batch, for this random-init model and for the trained demo model
   (ShapesNet, 64 px held-out shapes images): int8 rounding moves random-init maps far more.

The images/s of the same files come from the benchmark runner (``cam-engine bench --backends
ort-plain,ort-cam,ort-cam-top3,ort-cam-int8,ort-cam-int8-dynamic``). Kernel times add up the
time each node ran, so on a loaded machine they grow with the load as the wall time does; the
load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from cam_engine.bench import backends as bk
from cam_engine.bench.harness import make_case
from cam_engine.bench.models import ModelSpec
from cam_engine.bench.ort_profile import overhead_table, profile_sessions
from cam_engine.export import OrtCAM, quantize, to_onnx


def int8_errors(fp32: Path, copies: dict[str, Path], x: np.ndarray) -> list[str]:
    """Markdown rows: each int8 copy's top-1 maps against the float32 file's on ``x``."""
    want = OrtCAM(fp32)(x)
    rows = []
    for mode, path in copies.items():
        got = OrtCAM(path)(x)
        diff = np.abs(got.heatmaps[:, 0] - want.heatmaps[:, 0])
        same = (got.classes[:, 0] == want.classes[:, 0]).mean()
        rows.append(f"| {mode} | {diff.max():.3f} | {diff.mean():.4f} | {same:.0%} |")
    return rows


def demo_files(folder: Path) -> tuple[Path, dict[str, Path], np.ndarray]:
    """The trained demo model exported and quantised, and 32 held-out images."""
    from cam_engine.demo import model as demo
    from cam_engine.demo import shapes

    path = folder / "shapes.onnx"
    to_onnx(demo.pretrained(), path, "features", input_size=(64, 64), mean=(0, 0, 0),
            std=(1, 1, 1))  # fmt: skip
    calibration = [shapes.single(32, 64, seed=7).images.numpy()]
    copies = {
        "static": quantize(path, folder / "shapes-static.onnx", "static", calibration),
        "dynamic": quantize(path, folder / "shapes-dynamic.onnx", "dynamic"),
    }
    return path, copies, shapes.single(32, 64, seed=123).images.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=5, help="profiled rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"))
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(args.model, size=args.input_size)
    case = make_case(spec, args.batch_size, None, "gradcam", args.workdir)
    x = case.x.numpy()
    plain = bk.ort_plain_file(case)
    files = {"plain": plain, "top-1": bk.ort_cam_file(case), "top-3": bk.ort_cam_file(case, 3)}
    copies = {mode: bk.ort_cam_file(case, 1, mode) for mode in ("static", "dynamic")}
    import onnxruntime as ort

    plain_input = ort.InferenceSession(str(plain)).get_inputs()[0].name
    feeds = {label: (path, {"x": x}) for label, path in files.items()}
    feeds["plain"] = (plain, {plain_input: x})
    torch.set_num_threads(1)  # torch is idle here; ONNX Runtime has the cores
    profiles = profile_sessions(feeds, args.runs, args.warmup, args.threads)
    load = "load average {:.1f} {:.1f} {:.1f} (1, 5, 15 min)".format(*os.getloadavg())
    title = f"{args.model}, batch {args.batch_size}, {args.input_size} px, Grad-CAM"
    for label in ("top-1", "top-3"):
        cam, base = profiles[label], profiles["plain"]
        print(f"\n{title}, CAM model {label}: kernels {cam.kernel_ms / base.kernel_ms:.3f}x "
              f"the plain model's, wall {cam.wall_ms / base.wall_ms:.3f}x ({load})\n")  # fmt: skip
        print(overhead_table(base, cam))
    header = "| int8 | max abs diff | mean abs diff | same top-1 class |\n|---|--:|--:|--:|"
    print(f"\nint8 top-1 maps against float32, {title} (random init), the timed batch:\n")
    print("\n".join([header, *int8_errors(files["top-1"], copies, x)]))
    with tempfile.TemporaryDirectory() as folder:
        path, demo_copies, images = demo_files(Path(folder))
        print("\nint8 top-1 maps against float32, ShapesNet (trained), 32 held-out images:\n")
        print("\n".join([header, *int8_errors(path, demo_copies, images)]))


if __name__ == "__main__":
    main()
