"""Child process of :func:`cam_engine.bench.harness.peak_memory_child`.

``python -m cam_engine.bench.memory '<json request>'`` prints ``{"peak_bytes": N}``: the peak
resident-set growth of one call of a backend, after warm-up, read from ``/proc/self/status``.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path

import torch

from . import backends as bk
from .harness import make_case
from .models import ModelSpec


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(request: dict) -> int:
    """Peak RSS growth in bytes of one call of the requested backend."""
    torch.set_num_threads(request["threads"])
    spec = ModelSpec(**request["spec"])
    method = request["method"] if request["method"] != "-" else "gradcam"
    case = make_case(spec, request["batch"], request["layer"], method, Path(request["workdir"]))
    with spec.autocast_context():
        return peak_growth(bk.get(request["backend"]).prepare(case), case.x)


def peak_growth(ready: bk.Prepared, x: torch.Tensor, warmup: int = 2) -> int:
    """Peak resident-set growth in bytes of one ``ready.call(x)`` after ``warmup`` calls."""
    for _ in range(warmup):
        ready.run(x)
    ready.attach()
    try:
        gc.collect()
        if _reset_peak():
            before = _status_kib("VmRSS")
            ready.call(x)
            peak = _status_kib("VmHWM")
        else:  # no /proc: the lifetime peak, which includes building the model
            before = 0
            ready.call(x)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        ready.detach()
    return max(0, (peak - before) * 1024)


if __name__ == "__main__":
    print(json.dumps({"peak_bytes": measure(json.loads(sys.argv[1]))}))
