"""``cam-engine bench``: images/s, explain overhead and peak memory of every backend."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..arguments import AUTOCAST, BENCH_BACKENDS, COMPILE_MODES, add_run_arguments
from .common import quiet_torch_logs, square_side

HELP = "benchmark the engine against plain inference and the hook-based libraries"

#: what --quick changes: a smoke test of every backend in well under a minute
QUICK = {"models": "resnet18", "batch": 2, "size": 64, "repeats": 3, "warmup": 1}
#: backends --quick leaves out unless named (torch.compile takes minutes on a small CPU)
SLOW_BACKENDS = ("engine-compile",)
#: the --backends name of the explain-job rows (cam_engine.bench.pipeline)
PIPELINE = "pipeline"
#: the settings' option names, as the repeat command line spells them
OPTIONS = {
    "models": "--models",
    "batch": "--batch-size",
    "size": "--input-size",
    "repeats": "--repeats",
    "warmup": "--warmup",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", "--model", help="comma-separated torchvision models (default: resnet50,vgg16)"
    )
    add_run_arguments(
        parser,
        layer_help="target layer (default: the engine's choice per model)",
        batch_help="images per call (default: 8)",
        size_help="S (or S,S or SxS): the square images' side (default: 224)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    parser.add_argument("--methods", default="gradcam,cam", help="comma-separated methods")
    parser.add_argument(
        "--backends",
        help="comma-separated, default all: "
        + ",".join([*BENCH_BACKENDS, PIPELINE])
        + f" ({PIPELINE}: the whole explain job on JPEG files against the engine alone)",
    )
    parser.add_argument(
        "--pipeline-images",
        type=int,
        help=f"JPEG files per size in the {PIPELINE} rows (default: 4 batches); more files "
        "spread the job's fixed costs (threads, merging) as a data set does",
    )
    parser.add_argument(
        "--pipeline-workers",
        type=int,
        help=f"decoding threads of the job in the {PIPELINE} rows (default: the job's, "
        "explain --workers)",
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per backend (default: 10)")
    parser.add_argument("--warmup", type=int, help="untimed calls per backend first (default: 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights/inputs")
    parser.add_argument(
        "--autocast",
        choices=list(AUTOCAST),
        help="run the PyTorch backends under torch.autocast of this dtype (ONNX Runtime: skipped)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=list(COMPILE_MODES),
        help="torch.compile mode of the engine-compile backend (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory phase, which runs each backend and method in a fresh process "
        "(16 processes per model with the default backends and methods: minutes even for a "
        "short run)",
    )
    parser.add_argument(
        "--no-all-classes", action="store_true", help="skip the 'all classes at once' comparison"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder")
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the model files (ONNX) the run exports to OUT/models; by default the files "
        "it created are deleted at its end",
    )
    parser.add_argument(
        "--markdown", type=Path, help="where to write the tables (default OUT/BENCHMARKS.md)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: resnet18, batch 2, 64 px, 3 rounds, 1 thread, no torch.compile or memory",
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only render an existing results file"
    )


def _names(spec: str, allowed: list[str], what: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or spec!r}; available: {', '.join(allowed)}")
    return names


def _settings(args: argparse.Namespace) -> dict:
    """The run's settings: explicit arguments, else --quick's, else the headline defaults."""
    from .. import methods
    from ..bench import backends as bk

    defaults = {"models": "resnet50,vgg16", "batch": 8, "size": 224, "repeats": 10, "warmup": 2}
    chosen = {**defaults, **(QUICK if args.quick else {})}
    given = {
        "models": args.models,
        "batch": args.batch_size,
        "size": None if args.input_size is None else square_side(args.input_size),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    chosen.update({k: v for k, v in given.items() if v is not None})
    every = [*bk.available(), PIPELINE]
    if args.backends:
        names = _names(args.backends, every, "backend(s)")
    else:
        names = [b for b in every if not (args.quick and b in SLOW_BACKENDS)]
    chosen["backends"] = names
    chosen["methods"] = _names(args.methods, methods.available(), "method(s)")
    chosen["models"] = [m.strip() for m in chosen["models"].split(",") if m.strip()]
    for key in ("batch", "size", "repeats"):
        if chosen[key] < 1:
            raise ValueError(f"{OPTIONS[key]} must be >= 1, got {chosen[key]}")
    if args.pipeline_images is not None and args.pipeline_images < 1:
        raise ValueError(f"--pipeline-images must be >= 1, got {args.pipeline_images}")
    if args.pipeline_workers is not None and args.pipeline_workers < 0:
        raise ValueError(f"--pipeline-workers must be >= 0, got {args.pipeline_workers}")
    return chosen


def _write(doc: dict, args: argparse.Namespace, command: str) -> None:
    from ..bench import report

    args.out.mkdir(parents=True, exist_ok=True)
    text = report.markdown(doc, command)
    markdown = args.markdown or args.out / "BENCHMARKS.md"
    markdown.write_text(text)
    chart = args.out / "bench.png"
    report.bar_chart(doc, chart)
    print(text)
    print(f"wrote {markdown}, {chart}")


def _command(cfg: dict, args: argparse.Namespace) -> str:
    """The command line that repeats this run, every setting spelled out."""
    import torch

    parts = ["cam-engine", "bench", "--models", ",".join(cfg["models"])]
    for key in ("batch", "size", "repeats", "warmup"):
        parts += [OPTIONS[key], str(cfg[key])]
    parts += ["--device", args.device, "--methods", ",".join(cfg["methods"])]
    parts += ["--backends", ",".join(cfg["backends"]), "--threads", str(torch.get_num_threads())]
    flags = ("channels_last", "no_memory", "no_all_classes", "keep_models")
    parts += ["--" + f.replace("_", "-") for f in flags if getattr(args, f)]
    if args.quick and not args.no_memory:
        parts.append("--no-memory")
    if args.target_layer:
        parts += ["--target-layer", args.target_layer]
    if args.autocast:
        parts += ["--autocast", args.autocast]
    if args.compile_mode:
        parts += ["--compile-mode", args.compile_mode]
    if args.pipeline_images:
        parts += ["--pipeline-images", str(args.pipeline_images)]
    if args.pipeline_workers is not None:
        parts += ["--pipeline-workers", str(args.pipeline_workers)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import report
    from ..loading import resolve_device

    quiet_torch_logs()
    if args.render:
        doc = json.loads(args.render.read_text())
        _write(doc, args, doc["config"].get("command", ""))
        return 0
    resolve_device(args.device)  # before any model is built
    if args.threads or args.quick:
        # one thread by default for --quick: two OpenMP threads on a busy 2-core machine can
        # run 20x slower than one (measured: resnet18 at 64 px, 2.1 s vs 0.08 s per batch)
        torch.set_num_threads(args.threads or 1)
    cfg = _settings(args)
    command = _command(cfg, args)
    backends = [b for b in cfg["backends"] if b != PIPELINE]
    models = args.out / "models"
    before = set(models.rglob("*")) if models.exists() else set()
    try:
        rows, everything = _measure(args, cfg, backends)
    finally:
        if not args.keep_models:
            _remove_new(models, before)
    config = {
        **cfg,
        "device": args.device,
        "channels_last": args.channels_last,
        "autocast": args.autocast,
        "compile_mode": args.compile_mode,
        "command": command,
    }
    doc = report.results(rows, everything, report.environment(args.device), config)
    report.save_json(doc, args.out / "results.json")
    _write(doc, args, command)
    print(f"wrote {args.out / 'results.json'}")
    return 0


def _remove_new(folder: Path, before: set[Path]) -> None:
    """Delete what ``folder`` holds beyond the paths ``before`` (the folder too, if empty)."""
    if not folder.exists():
        return
    for path in sorted(set(folder.rglob("*")) - before, reverse=True):  # files before folders
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    if not before:
        folder.rmdir()


def _measure(args: argparse.Namespace, cfg: dict, backends: list[str]) -> tuple[list, list]:
    """The rows and the all-classes comparisons of every model."""
    from ..bench.harness import run_all_classes, run_model
    from ..bench.models import ModelSpec
    from ..bench.pipeline import run_pipeline

    rows, everything = [], []
    for name in cfg["models"]:
        spec = ModelSpec(
            name,
            cfg["size"],
            device=args.device,
            channels_last=args.channels_last,
            autocast=args.autocast,
            compile_mode=args.compile_mode,
        )
        print(f"{name}: batch {cfg['batch']}, {cfg['size']}px, {args.device}", file=sys.stderr)
        if backends:
            rows += run_model(
                spec,
                cfg["batch"],
                cfg["methods"],
                backends,
                layer=args.target_layer,
                warmup=cfg["warmup"],
                repeats=cfg["repeats"],
                memory=not (args.no_memory or args.quick),
                workdir=args.out / "models",
            )
        if PIPELINE in cfg["backends"]:
            rows += run_pipeline(
                spec,
                cfg["batch"],
                cfg["methods"][0],
                layer=args.target_layer,
                images=args.pipeline_images,
                workers=args.pipeline_workers,
                warmup=max(1, cfg["warmup"]),
                repeats=cfg["repeats"],
                workdir=args.out,
            )
        if not args.no_all_classes and "gradcam" in cfg["methods"]:
            everything.append(
                run_all_classes(
                    spec, cfg["batch"], layer=args.target_layer, repeats=min(3, cfg["repeats"])
                )
            )
    return rows, everything
