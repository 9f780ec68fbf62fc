"""``cam-engine profile``: where the time of one explain call goes, next to the hook-based way."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..arguments import METHODS, add_run_arguments
from .common import quiet_torch_logs, square_side

HELP = "profile one explain call stage by stage (torch.profiler), beside the hook-based reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet50", help="torchvision model (random weights)")
    add_run_arguments(
        parser,
        layer_help="target layer (default: the engine's choice)",
        batch_help="images per call",
        batch_size=8,
        size_help="S (or S,S or SxS): the square images' side (default: 224)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    parser.add_argument("--method", default="gradcam", help="one of " + ", ".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="profiled calls (after 1 warm-up)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--no-reference", action="store_true", help="profile only the engine, not the hook way"
    )
    parser.add_argument("--out", type=Path, default=Path("out/profile"), help="output folder")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import profiling
    from ..bench.harness import make_case
    from ..bench.models import ModelSpec
    from ..engine import CAMEngine

    quiet_torch_logs()
    if args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--batch-size and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = square_side(args.input_size or (224, 224))
    spec = ModelSpec(args.model, size, device=args.device)
    case = make_case(spec, args.batch_size, args.target_layer, args.method, args.out)
    engine = CAMEngine(case.model, case.layer, args.method)
    args.out.mkdir(parents=True, exist_ok=True)
    traces = {"engine": args.out / "trace_engine.json"}
    ours = profiling.profile_engine(engine, case.x, args.repeats, traces["engine"])
    reference = None
    if not args.no_reference:
        traces["reference"] = args.out / "trace_reference.json"
        # the reference is classic Grad-CAM: it is the baseline whatever --method is
        reference = profiling.profile_reference(
            case.model, case.layer, case.x, args.repeats, traces["reference"]
        )
    title = (
        f"{args.model} at {case.layer!r}, batch {args.batch_size}, {size}x{size}, "
        f"{args.device}, {torch.get_num_threads()} threads, {args.method} "
        f"(reference: hook-based Grad-CAM); mean of {args.repeats} calls"
    )
    text = f"{title}\n\n{profiling.table(ours, reference)}\n"
    print(text)
    (args.out / "profile.md").write_text(text)
    doc = {p.name: {"stages_ms": p.stages, "total_ms": p.total} for p in (ours, reference) if p}
    (args.out / "profile.json").write_text(json.dumps({"title": title, **doc}, indent=1))
    names = ", ".join(str(t) for t in traces.values())
    print(f"wrote {args.out / 'profile.md'}, {args.out / 'profile.json'}; chrome traces: {names}")
    print("open the traces in chrome://tracing or https://ui.perfetto.dev")
    return 0
