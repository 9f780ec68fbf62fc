"""Results: the JSON file, the markdown tables of BENCHMARKS.md and a PNG bar chart.

Everything here works on the JSON form (plain dicts), so a results file written on one machine
can be rendered on another (``cam-engine bench --render results.json``).
"""

from __future__ import annotations

import importlib.metadata
import json
import operator
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .backends import BACKENDS
from .harness import AllClasses, Measurement
from .pipeline import ENGINE, JOB

__all__ = [
    "TARGETS",
    "Target",
    "environment",
    "results",
    "save_json",
    "markdown",
    "bar_chart",
    "check_targets",
]

_PACKAGES = ("torch", "torchvision", "onnxruntime-gpu", "onnxruntime", "grad-cam", "torchcam")
_PACKAGES += ("captum", "cam-engine")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def environment(device: str) -> dict:
    """Machine, library versions and device name, recorded with every result."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": name,
        "versions": _versions(),
    }


def results(
    rows: Iterable[Measurement], all_classes: Iterable[AllClasses], env: dict, config: dict
) -> dict:
    """The JSON document of a run."""
    return {
        "environment": env,
        "config": config,
        "rows": [r.to_dict() for r in rows],
        "all_classes": [a.to_dict() for a in all_classes],
    }


def save_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


# Ratios ----------------------------------------------------------------------------------------


def _group(row: dict) -> tuple:
    return row["model"], row["batch"], row["size"], row["device"]


def _find(rows: list[dict], row: dict, backend: str, method: str | None) -> dict | None:
    for other in rows:
        if _group(other) == _group(row) and other["backend"] == backend:
            if method is None or other["method"] == method:
                return other if other["images_per_s"] else None
    return None


#: bytes: under this a baseline's peak gives no meaningful ratio (ONNX Runtime allocates its arena
#: when the session is created, so one call of the plain ORT model grows by a few KiB)
MEMORY_FLOOR = 1 << 20


def ratios(rows: list[dict]) -> list[dict]:
    """Rows with ``overhead`` (time / its plain baseline's time), ``vs_reference`` and
    ``vs_pgc`` (images/s over the hook reference's / pytorch-grad-cam's, same method) and
    ``memory_vs_plain`` (peak memory over the plain baseline's) added where both exist and the
    baseline's is at least :data:`MEMORY_FLOOR`."""
    out = []
    for row in rows:
        row = dict(row)
        ips = row["images_per_s"]
        backend = BACKENDS.get(row["backend"])
        base_name = backend.baseline if backend is not None else "plain"
        base = _find(rows, row, base_name, "-") if base_name else None
        ref = _find(rows, row, "reference", row["method"])
        pgc = _find(rows, row, "pytorch-grad-cam", row["method"])
        row["overhead"] = base["images_per_s"] / ips if ips and base else None
        row["vs_reference"] = ips / ref["images_per_s"] if ips and ref else None
        row["vs_pgc"] = ips / pgc["images_per_s"] if ips and pgc else None
        mem, base_mem = row["peak_memory_bytes"], base and base["peak_memory_bytes"]
        meaningful = mem is not None and base_mem is not None and base_mem >= MEMORY_FLOOR
        row["memory_vs_plain"] = mem / base_mem if meaningful else None
        out.append(row)
    return out


# Targets of the benchmark issue ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal on one measured ratio: ``row[metric] <op> value`` for the matching row."""

    model: str
    device: str
    batch: int
    method: str
    backend: str
    metric: str  # "vs_pgc", "overhead" or "memory_vs_plain"
    op: str  # ">=" or "<="
    value: float

    @property
    def label(self) -> str:
        what = {
            "vs_pgc": "images/s vs pytorch-grad-cam",
            "overhead": "explain overhead (time / plain)",
            "memory_vs_plain": "peak memory / plain inference's",
        }[self.metric]
        return f"{self.model} b{self.batch} {self.device} {self.method} {self.backend}: {what}"


TARGETS = (
    Target("resnet50", "cpu", 8, "gradcam", "engine", "vs_pgc", ">=", 3.5),
    Target("vgg16", "cpu", 8, "gradcam", "engine", "vs_pgc", ">=", 3.5),
    # overhead with and without the channels-last trunk input (plain inference has none)
    *(
        target
        for backend in ("engine", "engine-nchw")
        for target in (
            Target("resnet50", "cpu", 8, "gradcam", backend, "overhead", "<=", 1.15),
            Target("resnet50", "cpu", 8, "cam", backend, "overhead", "<=", 1.05),
            Target("vgg16", "cpu", 8, "gradcam", backend, "overhead", "<=", 1.2),
        )
    ),
    Target("resnet50", "cpu", 8, "gradcam", "engine", "memory_vs_plain", "<=", 1.3),
    Target("vgg16", "cpu", 8, "gradcam", "engine", "memory_vs_plain", "<=", 1.3),
    # the same speed-up target, met by the compiled trunk or the exported model
    *(
        Target(model, "cpu", 8, "gradcam", backend, "vs_pgc", ">=", 3.5)
        for model in ("resnet50", "vgg16")
        for backend in ("engine-compile", "ort-cam")
    ),
    Target("resnet50", "cuda", 64, "gradcam", "engine", "vs_pgc", ">=", 8.0),
    Target("resnet50", "cuda", 64, "gradcam", "engine", "overhead", "<=", 1.2),
    Target("resnet50", "cuda", 64, "cam", "ort-cam", "overhead", "<=", 1.1),
    Target("resnet50", "cuda", 64, "gradcam", "engine", "memory_vs_plain", "<=", 1.3),
)


def check_targets(rows: list[dict], targets: Iterable[Target] = TARGETS) -> list[dict]:
    """``{"target", "measured", "met"}`` for every target whose row is in ``rows`` (with
    ratios); the size must be 224."""
    compare = {">=": operator.ge, "<=": operator.le}
    checked = []
    for t in targets:
        for row in rows:
            match = (row["model"], row["device"].split(":")[0], row["batch"], row["size"])
            if match != (t.model, t.device, t.batch, 224):
                continue
            if (row["method"], row["backend"]) != (t.method, t.backend):
                continue
            measured = row.get(t.metric)
            if measured is not None:
                met = compare[t.op](measured, t.value)
                checked.append(
                    {"target": f"{t.label} {t.op} {t.value}", "measured": measured, "met": met}
                )
    return checked


# Markdown --------------------------------------------------------------------------------------


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else ""


def _mib(value: int | None) -> str:
    return f"{value / 2**20:,.0f}" if value is not None else ""


def _diff(value: float | None) -> str:
    return f"{value:.1e}" if value is not None else ""


def _rate(row: dict) -> str:
    """Images/s and the interquartile range of its rounds: ``21.5 (21.0-22.1)``."""
    text = f"{row['images_per_s']:,.1f}"
    spread = row.get("images_per_s_iqr")  # absent from results files of earlier versions
    return text + (f" ({spread[0]:,.1f}-{spread[1]:,.1f})" if spread else "")


def _load(item: dict) -> str:
    """The load-average sentence of a table, or ``""`` when it was not recorded."""
    load = item.get("load_avg")
    if not load:
        return ""
    return (
        f"Load average when measured: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 "
        "minutes)."
    )


def _loads(items: list[dict]) -> list[str]:
    """The distinct load-average sentences of rows measured together, as paragraph lines."""
    found = list(dict.fromkeys(_load(item) for item in items if _load(item)))
    return [" ".join(found), ""] if found else []


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | backend | images/s (IQR) | overhead (time / plain) | vs hook reference "
        "| vs pytorch-grad-cam | peak memory MiB (x plain) | max abs diff vs engine | notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if r["skipped"]:
            lines.append(
                f"| {r['method']} | {r['backend']} | | | | | | | skipped: "
                f"{r['skipped'].replace('|', '/')} |"
            )
            continue
        memory = _mib(r["peak_memory_bytes"])
        if r["memory_vs_plain"] is not None:
            memory += f" ({r['memory_vs_plain']:.2f}x)"
        lines.append(
            f"| {r['method']} | {r['backend']} | {_rate(r)} | {_x(r['overhead'])} "
            f"| {_x(r['vs_reference'])} | {_x(r['vs_pgc'])} | {memory} | {_diff(r['max_diff'])} "
            f"| {r['note'].strip()} |"
        )
    return lines


def _all_classes_table(items: list[dict]) -> list[str]:
    lines = [
        "| model | batch | classes | engine, one call (s) | pytorch-grad-cam, one class a call "
        "(s, extrapolated) | speed-up | max abs diff (class 0) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for a in items:
        if a["skipped"]:
            lines.append(f"| {a['model']} | {a['batch']} | | | | | skipped: {a['skipped']} |")
            continue
        calls = len(a["pgc_call_s"])
        pgc, engine = a["pgc_extrapolated_s"], a["engine_median_s"]
        lines.append(
            f"| {a['model']} | {a['batch']} | {a['classes']} | {engine:.3f} | {pgc:,.1f} "
            f"(median of {calls} calls x {a['classes']}) | {pgc / engine:,.0f}x "
            f"| {_diff(a['max_diff'])} |"
        )
    return lines


def _pipeline_table(rows: list[dict]) -> list[str]:
    """The explain job against the engine alone, per model and photo size."""
    lines = [
        "| model | method | batch | photos | images | engine alone, images/s (IQR) "
        "| explain job, images/s (IQR) | job / engine | load average (1, 5, 15 min) |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    engines = {(*_group(r), r["method"], r["photos"]): r for r in rows if r["backend"] == ENGINE}
    for job in (r for r in rows if r["backend"] == JOB):
        engine = engines.get((*_group(job), job["method"], job["photos"]))
        if engine is None:
            continue
        lines.append(
            f"| {job['model']} | {job['method']} | {job['batch']} | {job['photos']} "
            f"| {job['images']} | {_rate(engine)} | {_rate(job)} "
            f"| {job['images_per_s'] / engine['images_per_s']:.2f}x "
            f"| {', '.join(f'{x:.2f}' for x in job.get('load_avg') or ())} |"
        )
    return lines


def markdown(doc: dict, command: str = "") -> str:
    """BENCHMARKS.md text of a results document."""
    env = doc["environment"]
    jobs = [r for r in doc["rows"] if r.get("photos")]
    rows = ratios([r for r in doc["rows"] if not r.get("photos")])
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    out = [
        "# Benchmarks",
        "",
        f"Measured {env['date']} on {env['device_name']} ({env['cpu_count']} CPU cores, "
        f"{env['torch_threads']} torch threads), {env['platform']}, Python {env['python']}.",
        f"Versions: {versions}.",
    ]
    if command:
        out += ["", f"Command: `{command}`"]
    cfg = doc["config"]
    out += [
        "",
        f"Warm-up {cfg['warmup']} calls per backend, then the median of {cfg['repeats']} "
        "interleaved rounds (every backend once per round, the order rotated each round). "
        "Every backend explains each image's top-1 class and returns heatmaps at the input size; "
        "'max abs diff vs engine' checks they computed the same maps. Overhead is the time of "
        "one call over plain inference's (ort-cam: over the plain ONNX Runtime model's). Peak "
        "memory: CPU, the peak resident-set growth of one call in a fresh process per backend; "
        "CUDA, `torch.cuda.max_memory_allocated` above the memory allocated before the call. "
        "In brackets: the interquartile range of the rounds' images/s.",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    for (model, batch, size, device), group in groups.items():
        out += ["", f"## {model}, batch {batch}, {size}x{size}, {device}", ""]
        out += _loads(group)
        out += _table(group)
    if doc["all_classes"]:
        out += ["", "## All classes at once (Grad-CAM, closed form)", ""]
        out += [
            "The engine computes every class map of a batch in one call; pytorch-grad-cam "
            "needs one call per class: a few calls are measured and the total extrapolated.",
            "",
        ]
        out += _loads(doc["all_classes"])
        out += _all_classes_table(doc["all_classes"])
    if jobs:
        out += ["", "## The whole explain job", ""]
        out += [
            "`cam-engine explain` with every output on (decoding the JPEG files, the engine, "
            "maps at each image's size, overlays, contact sheets, PNG and NPZ files) against the "
            "engine alone on the same images, decoded and resized beforehand: one timed call "
            "explains the whole folder.",
            "",
        ]
        out += _pipeline_table(jobs)
    checked = check_targets(rows)
    if checked:
        out += ["", "## Targets", "", "| target | measured | met |", "|---|--:|---|"]
        out += [
            f"| {c['target']} | {c['measured']:.2f} | {'yes' if c['met'] else '**no**'} |"
            for c in checked
        ]
    return "\n".join(out) + "\n"


# Bar chart ---------------------------------------------------------------------------------------


def bar_chart(doc: dict, path: Path, width: int = 900) -> None:
    """A PNG of images/s per backend, one panel per (model, batch, size, device) and method.

    Drawn with Pillow only (no matplotlib needed).
    """
    rows = [r for r in doc["rows"] if r["images_per_s"] and not r.get("photos")]
    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        plain = r["method"] == "-"
        methods = {x["method"] for x in rows if _group(x) == _group(r) and x["method"] != "-"}
        for method in sorted(methods) if plain else [r["method"]]:
            panels.setdefault((*_group(r), method), []).append(r)
    font = ImageFont.load_default(size=14)
    title_font = ImageFont.load_default(size=16)
    bar, gap, label_w, margin = 22, 6, 170, 16
    height = margin + sum(40 + len(p) * (bar + gap) for p in panels.values()) + margin
    image = Image.new("RGB", (width, max(height, 60)), "white")
    draw = ImageDraw.Draw(image)
    grey, ours = (140, 140, 140), (31, 119, 180)
    colours = {  # other libraries: red
        "plain": grey,
        "ort-plain": grey,
        **dict.fromkeys(("engine", "engine-nchw", "engine-compile", "ort-cam"), ours),
    }
    y = margin
    for (model, batch, size, device, method), items in panels.items():
        draw.text(
            (margin, y),
            f"{model}  batch {batch}  {size}px  {device}  {method}  (images/s)",
            fill="black",
            font=title_font,
        )
        y += 30
        top = max(r["images_per_s"] for r in items)
        span = width - label_w - 2 * margin - 80
        for r in items:
            length = max(1, round(span * r["images_per_s"] / top))
            colour = colours.get(r["backend"], (214, 39, 40))
            draw.text((margin, y + 3), r["backend"], fill="black", font=font)
            x0 = margin + label_w
            draw.rectangle((x0, y, x0 + length, y + bar), fill=colour)
            draw.text(
                (x0 + length + 6, y + 3), f"{r['images_per_s']:,.1f}", fill="black", font=font
            )
            y += bar + gap
        y += 10
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
