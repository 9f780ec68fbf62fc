"""Where the time of one explain call goes, from ``torch.profiler``, ours next to the hook way.

Our side is an ordinary :class:`~cam_engine.CAMEngine` call, of any method: the engine labels its
own stages with ``record_function`` (:data:`cam_engine.explainer.STAGES`), and the colour map and
host transfer that follow are labelled here. The reference side is ``HookGradCAM``: its forward
is labelled through hooks on the user's model, its backward is the sum of the autograd engine's
``evaluate_function`` events, and the rest of the call (channel weights, ReLU, upsampling,
normalisation) is what remains. On CUDA the table reads the labels' CPU-side time; the Chrome
trace has the kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

from .. import postprocess
from ..engine import CAMEngine
from ..explainer import STAGES as ENGINE_STAGES
from ..reference import HookGradCAM
from .harness import synchronize

__all__ = [
    "STAGES",
    "Profile",
    "engine_call",
    "reference_pipeline",
    "profile_engine",
    "profile_reference",
    "table",
]

#: table rows, in pipeline order; each side fills the ones it has
STAGES = (
    *ENGINE_STAGES[:3],
    "forward (full model)",
    *ENGINE_STAGES[3:6],
    "backward (whole network)",
    *ENGINE_STAGES[6:],
    "rest: weights, ReLU, upsample + normalise",
    "colour map",
    "host transfer",
)
_BACKWARD_EVENT = "autograd::engine::evaluate_function"


@contextmanager
def _stage(label: str, device: torch.device) -> Iterator[None]:
    """A profiler range that ends only once the device has finished the stage's work."""
    with record_function(label):
        yield
        synchronize(device)


@contextmanager
def labelled(module: nn.Module, label: str, device: torch.device) -> Iterator[None]:
    """Every forward of ``module`` inside the block is a profiler range called ``label``."""
    open_ranges: list[record_function] = []

    def enter(_module: nn.Module, _args: object) -> None:
        open_ranges.append(record_function(label).__enter__())

    def leave(_module: nn.Module, _args: object, _out: object) -> None:
        synchronize(device)
        open_ranges.pop().__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def engine_call(engine: CAMEngine, x: Tensor, colormap: str = "jet") -> tuple[Tensor, Tensor]:
    """One top-1 explain call of ``engine``, then its colour images and their host copy.

    Returns:
        heatmaps (B, 1, H, W) on ``x``'s device and their colour images (B, 1, 3, H, W) uint8 on
        the CPU.
    """
    heatmaps = engine(x).heatmaps
    with torch.no_grad():
        with _stage("colour map", x.device):
            colours = postprocess.colorize(heatmaps, colormap)
        with _stage("host transfer", x.device):
            colours = colours.cpu()
    return heatmaps, colours


def reference_pipeline(
    explainer: HookGradCAM, x: Tensor, colormap: str = "jet"
) -> tuple[Tensor, Tensor]:
    """One top-1 call of the hook-based reference, its forward labelled, then colour + host."""
    device = x.device
    with labelled(explainer.model, "forward (full model)", device):
        heatmaps = explainer(x).heatmaps
    with torch.no_grad():
        with _stage("colour map", device):
            colours = postprocess.colorize(heatmaps, colormap)
        with _stage("host transfer", device):
            colours = colours.cpu()
    return heatmaps, colours


@dataclass
class Profile:
    """Milliseconds per call of each stage; ``total`` is the whole call."""

    name: str
    stages: dict[str, float]
    total: float

    @property
    def other(self) -> float:
        """Time of the call in no labelled stage (Python glue, class selection, ...)."""
        return self.total - sum(self.stages.values())


def _profile(
    name: str, fn, x: Tensor, repeats: int, trace: Path | None, whole_backward: bool = False
) -> Profile:
    """Profile ``repeats`` calls of ``fn(x)``; ``whole_backward`` sums the autograd engine's
    events into the "backward (whole network)" stage (for the side that has no labels there)."""
    fn(x)  # warm-up: lazy initialisation and first-call allocations stay out of the profile
    activities = [ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            with _stage(f"call: {name}", x.device):
                fn(x)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    stages: dict[str, float] = {}
    total = 0.0
    for event in prof.key_averages():
        ms = event.cpu_time_total / 1000 / repeats
        if event.key in STAGES:
            stages[event.key] = stages.get(event.key, 0.0) + ms
        elif whole_backward and event.key.startswith(_BACKWARD_EVENT):
            stages["backward (whole network)"] = stages.get("backward (whole network)", 0) + ms
        elif event.key == f"call: {name}":
            total = ms
    return Profile(name, stages, total)


def profile_engine(
    engine: CAMEngine, x: Tensor, repeats: int = 3, trace: Path | None = None
) -> Profile:
    """Stage times of :func:`engine_call`, averaged over ``repeats`` calls."""
    return _profile("engine", lambda x: engine_call(engine, x), x, repeats, trace)


def profile_reference(
    model: nn.Module, layer: str, x: Tensor, repeats: int = 3, trace: Path | None = None
) -> Profile:
    """Stage times of the hook-based reference Grad-CAM; the rest of its call is one stage."""
    explainer = HookGradCAM(model, model.get_submodule(layer))

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        return reference_pipeline(explainer, x)

    result = _profile("reference", run, x, repeats, trace, whole_backward=True)
    labelled_ms = sum(result.stages.values())
    inner = result.total - labelled_ms
    result.stages["rest: weights, ReLU, upsample + normalise"] = max(inner, 0.0)
    return result


def table(ours: Profile, reference: Profile | None) -> str:
    """A markdown table: one row per stage, ms and share of the call, side by side."""
    sides = [p for p in (ours, reference) if p is not None]
    header = "| stage | " + " | ".join(f"{p.name} ms | %" for p in sides) + " |"
    lines = [header, "|---|" + "--:|--:|" * len(sides)]

    def cell(p: Profile, value: float | None) -> str:
        return f"{value:.2f} | {100 * value / p.total:.0f}%" if value is not None else " | "

    for stage in (*STAGES, "other (untracked)"):
        values = [p.other if stage.startswith("other") else p.stages.get(stage) for p in sides]
        if any(v is not None for v in values):
            lines.append(f"| {stage} | " + " | ".join(map(cell, sides, values)) + " |")
    lines.append("| **total** | " + " | ".join(f"{p.total:.2f} | 100%" for p in sides) + " |")
    return "\n".join(lines)
