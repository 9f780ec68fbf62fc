"""Every backend of ``cam_engine.bench`` under pytest-benchmark, grouped by model and method.

``cam-engine bench`` runs the same backends interleaved and writes the comparison tables; these
suites are for pytest-benchmark's own tooling (``--benchmark-compare``, histograms, CI history).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import ROUNDS

from cam_engine.bench import backends as bk
from cam_engine.engine import CAMEngine

#: the plain backends once, the others for Grad-CAM and CAM where they implement them
TASKS = [
    (name, method)
    for name, backend in bk.BACKENDS.items()
    for method in (("gradcam", "cam") if backend.baseline else ("-",))
    if method == "-" or bk.supports(backend, method)
]


@pytest.mark.parametrize(("backend", "method"), TASKS, ids=[f"{b}-{m}" for b, m in TASKS])
def test_backend(benchmark, case, backend, method):
    try:
        ready = bk.get(backend).prepare(
            replace(case, method="gradcam" if method == "-" else method)
        )
    except bk.Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.group = f"{case.tag} {method if method != '-' else 'gradcam/cam'}"
    benchmark.extra_info.update(backend=backend, method=method, layer=case.layer)
    ready.attach()  # one backend per test: its hooks may stay for all rounds
    try:
        benchmark.pedantic(ready.call, args=(case.x,), rounds=ROUNDS, warmup_rounds=1)
    finally:
        ready.detach()


def test_engine_all_classes(benchmark, case):
    """Grad-CAM maps of every class of the batch in one engine call (closed-form heads)."""
    engine = CAMEngine(case.model, case.layer, "gradcam")
    if engine.model.gap_linear is None:
        pytest.skip("no global-average-pool head: no closed form for all classes")
    with torch.no_grad():
        classes = case.model(case.x).shape[1]
    every = torch.arange(classes, device=case.x.device).expand(len(case.x), -1)
    benchmark.group = f"{case.tag} all classes"
    benchmark.pedantic(engine, args=(case.x, every), rounds=max(1, ROUNDS // 2), warmup_rounds=1)
