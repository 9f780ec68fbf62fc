"""What ``bench`` and ``profile`` share: square input sizes, torch's log lines kept quiet."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence


class _NoCudaHomeWarning(logging.Filter):
    """Drops torch.utils.cpp_extension's "No CUDA runtime is found" (a CUDA toolkit on a
    machine without a GPU), which torch.compile's first call prints and which says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


_NO_CUDA_HOME_WARNING = _NoCudaHomeWarning()


def quiet_torch_logs() -> None:
    """Silence the log lines of torch's internals that bench and profile cause on success.

    Kineto's (the profiler's) ``USDT: profiler_start`` lines and, on a machine without a GPU,
    its ``ERROR: gpuGetDeviceCount failed`` (``KINETO_LOG_LEVEL=6``, unless the environment
    sets it: ``KINETO_LOG_LEVEL=0`` shows them all), and the CUDA_HOME warning above. Call it
    before the first profiled call.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_HOME_WARNING)


def square_side(size: Sequence[int]) -> int:
    """The side S of an ``--input-size`` (H, W) with H == W: bench and profile time squares."""
    if size[0] != size[1]:
        raise ValueError(f"--input-size {size[0]},{size[1]}: expected a square, S or S,S")
    return size[0]
