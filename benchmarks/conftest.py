"""Configuration of the pytest-benchmark suites (``pytest benchmarks --benchmark-only``).

Environment variables choose the cases: ``CAM_BENCH_MODELS`` (comma-separated torchvision
names, default ``resnet50``), ``CAM_BENCH_BATCH`` (8), ``CAM_BENCH_SIZE`` (224),
``CAM_BENCH_DEVICE`` (``cpu``), ``CAM_BENCH_ROUNDS`` (5).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cam_engine.bench.harness import make_case
from cam_engine.bench.models import ModelSpec

MODELS = [m for m in os.environ.get("CAM_BENCH_MODELS", "resnet50").split(",") if m]
BATCH = int(os.environ.get("CAM_BENCH_BATCH", "8"))
SIZE = int(os.environ.get("CAM_BENCH_SIZE", "224"))
DEVICE = os.environ.get("CAM_BENCH_DEVICE", "cpu")
ROUNDS = int(os.environ.get("CAM_BENCH_ROUNDS", "5"))


@pytest.fixture(scope="module", params=MODELS)
def case(request, tmp_path_factory):
    """One model, its default target layer and a batch (shared by all backends of a module)."""
    spec = ModelSpec(request.param, SIZE, device=DEVICE)
    return make_case(spec, BATCH, None, "gradcam", Path(tmp_path_factory.mktemp("models")))
