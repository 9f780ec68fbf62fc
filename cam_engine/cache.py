"""Per-model state built once per model and per mode, device and dtype.

Traced graphs bake in the train/eval mode and the parameters' device and dtype, so everything
built from a model is keyed by :func:`state_key` as well as by what it is. Entries live as long as
the model (a weak reference), so nothing keeps a user's model alive.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

from torch import nn

__all__ = ["state_key", "per_model"]

T = TypeVar("T")
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def state_key(model: nn.Module) -> tuple:
    """``(training, (device, dtype))`` of the model's first parameter (or buffer)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    where = (tensor.device, tensor.dtype) if tensor is not None else None
    return model.training, where


def per_model(model: nn.Module, key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` once per ``model``, its :func:`state_key` and ``key``; then the same object.

    Built under a lock, so two threads never build the same entry twice.
    """
    with _LOCK:
        entries = _CACHE.setdefault(model, {})
        full = (state_key(model), key)
        if full not in entries:
            entries[full] = build()
        return entries[full]
