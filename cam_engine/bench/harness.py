"""Timing and memory: warm-up, then the median of interleaved repeats; peak memory per backend.

Interleaving (one call of every backend per round, the order rotated each round) spreads slow
drifts of the machine (other processes, thermal state) over all backends instead of loading them
on whichever ran last. Each backend is first checked to produce the same heatmaps as the engine.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..engine import CAMEngine
from ..model import wrap
from . import backends as bk
from .models import ModelSpec, build_model, example_batch

__all__ = [
    "Measurement",
    "loadavg",
    "run_model",
    "time_interleaved",
    "peak_memory_child",
    "peak_memory_cuda",
    "max_difference",
    "make_case",
    "synchronize",
    "AllClasses",
    "run_all_classes",
]


@dataclass
class Measurement:
    """One row of the results: a backend running one method on one model and batch.

    ``method`` is ``"-"`` for plain inference. ``skipped`` holds the reason a backend did not
    run (its numbers are then empty). ``max_diff`` is the largest absolute difference of its
    heatmaps from the engine's on the same batch. ``images`` is how many images one timed call
    explains when that is not ``batch`` (a pipeline row's folder of ``photos``, "HxW" JPEG
    files, see :mod:`cam_engine.bench.pipeline`). ``load_avg`` is the machine's load average
    (1, 5, 15 minutes) when the timing ended: on a shared machine, how busy it was.
    """

    model: str
    batch: int
    size: int
    device: str
    method: str
    backend: str
    times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    max_diff: float | None = None
    note: str = ""
    skipped: str | None = None
    images: int | None = None
    photos: str | None = None
    load_avg: tuple[float, float, float] | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def images_per_s(self) -> float | None:
        median = self.median_s
        return (self.images or self.batch) / median if median else None

    @property
    def images_per_s_iqr(self) -> tuple[float, float] | None:
        """The interquartile range of the rounds' images/s (low, high); ``None`` under 2 rounds."""
        if len(self.times_s) < 2:
            return None
        rates = [(self.images or self.batch) / t for t in self.times_s]
        low, _, high = statistics.quantiles(rates, n=4, method="inclusive")
        return low, high

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "median_s": self.median_s,
            "images_per_s": self.images_per_s,
            "images_per_s_iqr": self.images_per_s_iqr,
        }


def loadavg() -> tuple[float, float, float] | None:
    """The system's load average over 1, 5 and 15 minutes; ``None`` where there is none."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it (CUDA; nothing to wait for on
    the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, bk.Prepared],
    x: torch.Tensor,
    warmup: int,
    repeats: int,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each backend on ``x``: ``warmup`` untimed calls each, then
    ``repeats`` rounds of one call each.

    Round ``r`` runs the backends in the order rotated by ``r``, so none always follows the same
    one. A backend's hooks are attached just before its call and removed after it, outside the
    timed region. Returns ``{name: [repeats seconds]}``.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name].run(x)
    synchronize(x.device)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = tqdm(range(repeats), desc="timing", unit="round", disable=not progress, leave=False)
    for r in rounds:
        for name in names[r % len(names) :] + names[: r % len(names)]:
            ready = calls[name]
            ready.attach()
            try:
                synchronize(x.device)
                start = time.perf_counter()
                ready.call(x)
                synchronize(x.device)
                times[name].append(time.perf_counter() - start)
            finally:
                ready.detach()
    return times


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| of two heatmap batches (B, K, H, W); ``inf`` when their shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def peak_memory_cuda(ready: bk.Prepared, x: torch.Tensor) -> int:
    """Bytes allocated by one call above what was allocated before it (CUDA caching allocator)."""
    ready.attach()
    try:
        synchronize(x.device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        ready.call(x)
        synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    finally:
        ready.detach()


def peak_memory_child(
    spec: ModelSpec, batch: int, layer: str, method: str, backend: str, workdir: Path
) -> int:
    """Peak resident-memory growth of one call of ``backend``, measured in a fresh process.

    The child rebuilds the same model (same seed), warms the backend up, resets the kernel's
    peak-RSS counter and reports the peak minus the resident size before the call. glibc's
    ``malloc`` is told to return large blocks to the system on free (a fixed mmap threshold),
    otherwise memory freed by the warm-up would be reused silently and hide the peak.
    """
    request = {
        "spec": spec.to_dict(),
        "batch": batch,
        "layer": layer,
        "method": method,
        "backend": backend,
        "workdir": str(workdir),
        "threads": torch.get_num_threads(),
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(
        [sys.executable, "-m", "cam_engine.bench.memory", json.dumps(request)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory child failed: {done.stderr.strip()[-400:]}")
    return int(json.loads(lines[-1])["peak_bytes"])


def make_case(
    spec: ModelSpec, batch: int, layer: str | None, method: str, workdir: Path
) -> bk.Case:
    """The model of ``spec``, its target layer (the engine's default if ``None``) and a batch."""
    model = build_model(spec)
    layer = layer or wrap(model).target_layer
    tag = f"{spec.name}-b{batch}-{spec.size}-{spec.device.replace(':', '')}"
    if spec.channels_last:
        tag += "-cl"
    x = example_batch(spec, batch)
    fc = bk.fc_name(model, layer)
    return bk.Case(model, layer, method, x, workdir, tag, fc, spec.compile_mode)


def _tasks(methods: Sequence[str], backends: Iterable[str]) -> list[tuple[str, str]]:
    """(backend, method) pairs to run; plain backends once, with method ``"-"``."""
    tasks = []
    order = bk.available()  # the engine before the others: their maps are compared with its
    for name in sorted(set(backends), key=order.index):
        backend = bk.get(name)
        if backend.baseline is None:
            tasks.append((name, "-"))
        else:
            tasks += [(name, m) for m in methods if bk.supports(backend, m)]
    return tasks


def run_model(
    spec: ModelSpec,
    batch: int,
    methods: Sequence[str],
    backends: Sequence[str],
    *,
    layer: str | None = None,
    warmup: int = 2,
    repeats: int = 10,
    memory: bool = True,
    workdir: Path = Path("out/bench"),
    progress: bool = True,
) -> list[Measurement]:
    """Benchmark every (backend, method) on one model and batch, interleaved.

    Returns one :class:`Measurement` per pair, skipped ones included with their reason.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    case = make_case(spec, batch, layer, methods[0] if methods else "gradcam", workdir)
    rows: dict[tuple[str, str], Measurement] = {}
    x = case.x
    with spec.autocast_context():
        prepared = _prepare(spec, batch, methods, backends, case, rows)
        calls = {f"{n}/{m}": p for (n, m), p in prepared.items()}
        times = time_interleaved(calls, x, warmup, repeats, progress)
        load = loadavg()
        for name, method in prepared:
            rows[name, method].times_s = times[f"{name}/{method}"]
            rows[name, method].load_avg = load
        if memory and x.device.type == "cuda":
            for key, ready in prepared.items():
                rows[key].peak_memory_bytes = peak_memory_cuda(ready, x)
    if memory and x.device.type != "cuda":  # the child applies the spec's autocast itself
        pairs = tqdm(prepared, desc="memory", unit="backend", disable=not progress, leave=False)
        for name, method in pairs:
            try:
                rows[name, method].peak_memory_bytes = peak_memory_child(
                    spec, batch, case.layer, method, name, workdir
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                rows[name, method].note += f" (memory not measured: {exc})"
    return list(rows.values())


def _prepare(
    spec: ModelSpec,
    batch: int,
    methods: Sequence[str],
    backends: Sequence[str],
    case: bk.Case,
    rows: dict[tuple[str, str], Measurement],
) -> dict[tuple[str, str], bk.Prepared]:
    """Prepare every (backend, method), add its row, check its maps against the engine's."""
    prepared: dict[tuple[str, str], bk.Prepared] = {}
    reference_maps: dict[str, torch.Tensor] = {}
    for name, method in _tasks(methods, backends):
        backend = bk.get(name)
        row = Measurement(spec.name, batch, spec.size, spec.device, method, name, note=backend.note)
        rows[name, method] = row
        try:
            ready = backend.prepare(replace(case, method=method if method != "-" else "gradcam"))
            out = ready.run(case.x)
        except bk.Unavailable as exc:
            row.skipped = str(exc)
            continue
        except Exception as exc:  # a third-party library failing must not end the whole run
            row.skipped = f"failed: {type(exc).__name__}: {exc}".split("\n")[0][:300]
            continue
        prepared[name, method] = ready
        if ready.heatmaps is not None:
            maps = ready.heatmaps(out)
            reference_maps.setdefault(method, maps)  # the engine comes first when selected
            row.max_diff = max_difference(maps, reference_maps[method])
    return prepared


@dataclass
class AllClasses:
    """Every class map of a batch: the engine in one call vs pytorch-grad-cam one class a call.

    ``pgc_call_s`` are measured single-class calls (all B images, one class each); the time for
    all classes is extrapolated as their median times ``classes``. ``load_avg``: as in
    :class:`Measurement`.
    """

    model: str
    batch: int
    size: int
    device: str
    classes: int
    engine_s: list[float] = field(default_factory=list)
    pgc_call_s: list[float] = field(default_factory=list)
    max_diff: float | None = None
    skipped: str | None = None
    load_avg: tuple[float, float, float] | None = None

    @property
    def engine_median_s(self) -> float | None:
        return statistics.median(self.engine_s) if self.engine_s else None

    @property
    def pgc_extrapolated_s(self) -> float | None:
        return statistics.median(self.pgc_call_s) * self.classes if self.pgc_call_s else None

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "engine_median_s": self.engine_median_s,
            "pgc_extrapolated_s": self.pgc_extrapolated_s,
        }


def run_all_classes(
    spec: ModelSpec,
    batch: int,
    *,
    layer: str | None = None,
    repeats: int = 3,
    progress: bool = True,
) -> AllClasses:
    """Grad-CAM maps of every class for a batch; closed form only (GAP heads), else skipped."""
    case = make_case(spec, batch, layer, "gradcam", Path("."))
    engine = CAMEngine(case.model, case.layer, "gradcam")
    result = AllClasses(spec.name, batch, spec.size, spec.device, 0)
    if engine.cam_model.gap_linear is None:
        result.skipped = "no global-average-pool head: all classes would need batched backwards"
        return result
    x = case.x
    with torch.no_grad():
        result.classes = case.model(x).shape[1]
    every = torch.arange(result.classes, device=x.device).expand(batch, -1)
    try:
        pgc = bk.PgcCAM(case, "gradcam")
    except bk.Unavailable as exc:
        result.skipped = str(exc)
        return result
    classes = iter(range(10**9))  # a new class each call, as when looping over all of them
    calls = {
        "engine": bk.Prepared(lambda x: engine(x, every)),
        "pgc": bk.Prepared(lambda x: pgc(x, next(classes)), None, pgc.attach, pgc.detach),
    }
    with spec.autocast_context():
        # both compute the same map of class 0
        first = calls["engine"].run(x).heatmaps[:, :1]
        pgc_first = bk.Prepared(lambda x: pgc(x, 0), None, pgc.attach, pgc.detach).run(x)
        result.max_diff = max_difference(first, torch.from_numpy(pgc_first)[:, None])
        del first
        times = time_interleaved(calls, x, warmup=1, repeats=repeats, progress=progress)
    result.engine_s, result.pgc_call_s = times["engine"], times["pgc"]
    result.load_avg = loadavg()
    return result
