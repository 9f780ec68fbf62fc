"""Where an ONNX Runtime session's time goes, node by node, from ONNX Runtime's own profiler.

:func:`profile_sessions` runs files with ``SessionOptions.enable_profiling`` and reads back the
kernel time of every node of the graph ONNX Runtime actually ran (after its graph optimisations:
fused convolutions, NCHWc layout nodes). :func:`cam_engine.export.stages.stage` sorts the nodes
of a file written by :func:`cam_engine.export.to_onnx` by the part of the exported module they
come from, so :func:`overhead_table` can put the CAM model's extra nodes (top-k, the FC rows,
the einsum, the resize and min-max) next to the plain model's total.
``scripts/onnx_overhead.py`` regenerates the tables of BENCHMARKS.md with one command.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..export.stages import STAGES, stage

__all__ = ["NodeTime", "OrtProfile", "profile_sessions", "overhead_table"]


@dataclass(frozen=True)
class NodeTime:
    """One node of the optimised graph.

    Attributes:
        name: the node's name after ONNX Runtime's optimisations (a fused convolution takes the
            name of its output, ``<output>_nchwc``; layout changes are ``ReorderOutput*``).
        op: its operator type.
        ms: mean kernel time per run, in milliseconds.
    """

    name: str
    op: str
    ms: float


@dataclass(frozen=True)
class OrtProfile:
    """What :func:`profile_sessions` measured.

    Attributes:
        nodes: every node that ran, slowest first.
        wall_ms: median wall time of one ``session.run`` (profiling on), milliseconds.
        runs: profiled runs (after the warm-up ones, which are left out).
    """

    nodes: list[NodeTime]
    wall_ms: float
    runs: int

    @property
    def kernel_ms(self) -> float:
        """Sum of all nodes' kernel times per run."""
        return sum(node.ms for node in self.nodes)

    def by_stage(self) -> dict[str, float]:
        """Kernel ms per run of each :data:`STAGES` entry (zeros included)."""
        totals = dict.fromkeys(STAGES, 0.0)
        for node in self.nodes:
            totals[stage(node.name)] += node.ms
        return totals


def profile_sessions(
    files: Mapping[str, tuple[str | os.PathLike, Mapping[str, np.ndarray]]],
    runs: int = 5,
    warmup: int = 1,
    threads: int | None = None,
) -> dict[str, OrtProfile]:
    """Profile ONNX files on the CPU provider, one run of each per round (interleaved, as the
    benchmark runner times its backends, so that the machine's drifts hit every file alike).

    Args:
        files: a label -> (ONNX file, its inputs by name, fed to every run).
        runs: profiled rounds (>= 1); the per-node times are their mean.
        warmup: rounds before them, profiled by ONNX Runtime but left out here (the first run
            allocates its arena).
        threads: ONNX Runtime's intra-op threads (``None``: its default, one per core).

    Returns:
        label -> :class:`OrtProfile`.
    """
    import onnxruntime as ort

    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs} and {warmup}")
    with tempfile.TemporaryDirectory() as folder:
        sessions = {}
        for label, (path, _) in files.items():
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / f"ort-{len(sessions)}")
            if threads is not None:
                options.intra_op_num_threads = threads
            sessions[label] = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        walls: dict[str, list[float]] = {label: [] for label in files}
        for i in range(warmup + runs):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(None, dict(files[label][1]))
                if i >= warmup:
                    walls[label].append(time.perf_counter() - start)
        return {
            label: OrtProfile(
                _node_times(json.loads(Path(session.end_profiling()).read_text()), warmup, runs),
                statistics.median(walls[label]) * 1e3,
                runs,
            )
            for label, session in sessions.items()
        }


def _node_times(events: list[dict], warmup: int, runs: int) -> list[NodeTime]:
    """Mean kernel ms per run of each node, from the runs after the first ``warmup``."""
    runs_at = (e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    starts = sorted(runs_at)
    since = starts[warmup] if len(starts) > warmup else 0
    totals: dict[tuple[str, str], float] = defaultdict(float)
    suffix = "_kernel_time"
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith(suffix) and event["ts"] >= since:
            key = (event["name"][: -len(suffix)], event["args"].get("op_name", "?"))
            totals[key] += event["dur"] / 1e3
    nodes = [NodeTime(name, op, total / runs) for (name, op), total in totals.items()]
    return sorted(nodes, key=lambda node: -node.ms)


def overhead_table(plain: OrtProfile, cam: OrtProfile, top: int = 12) -> str:
    """Markdown: the CAM model's kernel time by stage against the plain model's total, then its
    ``top`` slowest nodes outside the trunk and head (the CAM's own cost)."""

    def share(ms: float) -> str:
        return f"{100 * ms / plain.kernel_ms:.2f}%"

    lines = [
        "| part | ms / run | share of plain |",
        "|---|--:|--:|",
        f"| plain model, all nodes | {plain.kernel_ms:.1f} | 100% |",
    ]
    stages = cam.by_stage()
    for name, ms in stages.items():
        lines.append(f"| CAM model: {name} | {ms:.1f} | {share(ms)} |")
    # the trunk is the plain model's own graph: the rest (the head included) bounds what
    # explaining adds, with no load noise from the trunk's seconds
    beyond = cam.kernel_ms - stages["trunk"]
    lines.append(f"| CAM model, all but the trunk | {beyond:.1f} | {share(beyond)} |")
    lines.append(f"| CAM model, all nodes | {cam.kernel_ms:.1f} | {share(cam.kernel_ms)} |")
    lines.append(f"| wall time per run: plain, CAM | {plain.wall_ms:.1f}, {cam.wall_ms:.1f} | |")
    lines += ["", "| CAM model node (outside trunk and head) | op | ms / run | share of plain |"]
    lines.append("|---|---|--:|--:|")
    extra = [n for n in cam.nodes if stage(n.name) not in ("trunk", "head")]
    for node in extra[:top]:
        lines.append(f"| `{node.name}` | {node.op} | {node.ms:.3f} | {share(node.ms)} |")
    rest = extra[top:]
    if rest:
        ms = sum(node.ms for node in rest)
        lines.append(f"| {len(rest)} other nodes | | {ms:.3f} | {share(ms)} |")
    return "\n".join(lines)
