"""Benchmarks of the cost of explaining: backends, timing harness, results and their rendering.

Shared by ``cam-engine bench``, ``cam-engine profile`` and the pytest-benchmark suites under
``benchmarks/``.
"""

from .backends import BACKENDS, Backend, Case, Prepared, Unavailable
from .harness import AllClasses, Measurement, run_all_classes, run_model, time_interleaved
from .models import ModelSpec, build_model, example_batch

__all__ = [
    "BACKENDS",
    "Backend",
    "Case",
    "Prepared",
    "Unavailable",
    "AllClasses",
    "Measurement",
    "run_all_classes",
    "run_model",
    "time_interleaved",
    "ModelSpec",
    "build_model",
    "example_batch",
]
