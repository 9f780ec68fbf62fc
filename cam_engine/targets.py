"""What to explain: which classes' scores the maps are computed for.

``targets`` accepted by :class:`cam_engine.CAMEngine`:

- ``None``: the top-1 predicted class of each image;
- an ``int``: that class for every image;
- a sequence or 1-D tensor of length B: one class per image;
- a (B, K) integer tensor: K classes per image;
- :class:`TopK` / :class:`BottomK`: the k highest / lowest scoring classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TopK", "BottomK", "Targets", "resolve_classes"]


@dataclass(frozen=True)
class TopK:
    """The ``k`` highest-scoring classes of each image, best first."""

    k: int = 1


@dataclass(frozen=True)
class BottomK:
    """The ``k`` lowest-scoring classes of each image, lowest first."""

    k: int = 1


Targets = None | int | Sequence[int] | Tensor | TopK | BottomK


def _ranked(logits: Tensor, k: int, largest: bool) -> Tensor:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > logits.shape[1]:
        raise ValueError(f"k={k} is larger than the number of classes ({logits.shape[1]})")
    return logits.topk(k, dim=1, largest=largest).indices


def resolve_classes(targets: Targets, logits: Tensor) -> Tensor:
    """Class ids to explain.

    Args:
        targets: see the module docstring.
        logits: (B, N) scores of the batch.

    Returns:
        (B, K) long tensor on ``logits``' device.
    """
    batch, num_classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1, keepdim=True)
    if isinstance(targets, TopK | BottomK):
        return _ranked(logits, targets.k, largest=isinstance(targets, TopK))
    if isinstance(targets, bool):
        raise ValueError("targets must be class ids, not a bool")
    if isinstance(targets, int):
        classes = torch.full((batch, 1), targets, dtype=torch.long, device=logits.device)
    else:
        classes = torch.as_tensor(targets, device=logits.device)
        if classes.is_floating_point() or classes.dtype == torch.bool:
            raise ValueError(f"class ids must be integers, got dtype {classes.dtype}")
        if classes.ndim == 1:
            classes = classes[:, None]
        if classes.ndim != 2 or classes.shape[0] != batch:
            raise ValueError(
                f"targets of shape {tuple(classes.shape)} do not fit a batch of {batch}: "
                "give one class per image (B,) or K per image (B, K)"
            )
        if classes.shape[1] == 0:
            raise ValueError("targets select no class (K = 0)")
        classes = classes.long()
    out_of_range = (classes < 0) | (classes >= num_classes)
    if out_of_range.any():
        bad = classes[out_of_range][0]
        raise ValueError(f"class index {int(bad)} out of range for {num_classes} classes")
    return classes
