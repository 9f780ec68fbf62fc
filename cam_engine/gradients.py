"""The gradient stage: dScore/dA of the explained targets, in closed form or by ``autograd.grad``.

The choice is made once per forward, in :func:`forward_record`: the closed form
(:class:`~cam_engine.heads.GapLinear`, ``W[c] / (h*w)``) is used when it was asked for, the targets
are class ids and the head is global-average-pool -> linear at this map; otherwise the head runs
with autograd and :func:`explained_gradients` differentiates the explained scores down to the
target map only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .targets import Resolved

if TYPE_CHECKING:
    from .heads import GapLinear
    from .model import CAMModel

__all__ = [
    "ForwardRecord",
    "forward_record",
    "explained_gradients",
    "target_gradients",
    "score_gradients",
]


@dataclass(frozen=True)
class ForwardRecord:
    """One forward through the split: what every later stage reads.

    Attributes:
        features: (B, *F) the target map in the layer's own layout. A leaf that requires grad
            when ``output`` carries the head's graph.
        output: the selected model output the targets score, (B, N) for classifiers.
        closed_form: the head's closed form when it is used for this forward, else ``None``.
            Set only when it was asked for, the targets are class ids and the head is
            global-average-pool -> linear at this map; ``output`` then carries no graph.
    """

    features: Tensor
    output: Tensor
    closed_form: GapLinear | None

    @property
    def has_graph(self) -> bool:
        """``output`` depends on ``features`` through the head with autograd."""
        return self.output.requires_grad and self.features.requires_grad


def forward_record(
    cam_model: CAMModel, x: Tensor, *, closed_form: bool, class_ids: bool, graph: bool = True
) -> ForwardRecord:
    """The trunk without autograd, then the head with autograd unless the closed form is used.

    This is the one place where the closed form is chosen.

    Args:
        cam_model: the model split at the target layer.
        x: (B, C, H, W) images.
        closed_form: the closed form may be used (the engine's ``closed_form`` option and a
            method that differentiates the explained scores themselves).
        class_ids: the targets are class ids (score functions have no closed form).
        graph: keep the head's graph when the closed form is not used; ``False`` for methods
            that take no gradient of the explained scores (the whole forward runs without
            autograd, and the closed form is still reported for methods that use it).
    """
    wanted = closed_form and class_ids
    if not graph:
        with torch.no_grad():
            output, features = cam_model(x)
        gap = cam_model.gap_linear
        usable = wanted and gap is not None and gap.applies(features)
        return ForwardRecord(features, output, gap if usable else None)
    features, output, gap = cam_model.explain_forward(x, closed_form=wanted)
    return ForwardRecord(features, output, gap if wanted else None)


def explained_gradients(record: ForwardRecord, targets: Resolved) -> Tensor:
    """dScore/dA of every explained target: (B, K, *F), in the layer's own layout.

    Closed form when :attr:`ForwardRecord.closed_form` is set, else one ``autograd.grad`` of
    batched one-hot targets through the head.
    """
    if record.closed_form is not None:
        return record.closed_form.gradients(targets.classes, record.features)
    if targets.one_hot:
        return score_gradients(record.output, record.features, targets.classes)
    rows = torch.arange(record.output.shape[0], device=record.output.device)
    return target_gradients(targets.scores(record.output, rows), record.features)


def target_gradients(scores: Tensor, inputs: Tensor) -> Tensor:
    """d scores[:, k] / d inputs for every k, by ``torch.autograd.grad`` only down to ``inputs``.

    Args:
        scores: (B, K), depending on ``inputs`` (row b on row b only).
        inputs: a tensor that requires grad: (B, *F).

    Returns:
        (B, K, *F). The K targets are one call: batched one-hot ``grad_outputs``.
    """
    k = scores.shape[1]
    if k == 1:
        (grads,) = torch.autograd.grad(scores, inputs, torch.ones_like(scores))
        return grads[:, None]
    one_hot = torch.eye(k, dtype=scores.dtype, device=scores.device)[:, None, :]
    (grads,) = torch.autograd.grad(
        scores, inputs, one_hot.expand(k, *scores.shape), is_grads_batched=True
    )
    return grads.movedim(0, 1)


def score_gradients(logits: Tensor, features: Tensor, classes: Tensor) -> Tensor:
    """dScore/dA for every explained class: :func:`target_gradients` of ``logits[b, classes]``.

    Args:
        logits: (B, N) scores depending on ``features`` through the head.
        features: the target map, a leaf that requires grad: (B, *F).
        classes: (B, K) class ids.

    Returns:
        (B, K, *F).
    """
    return target_gradients(logits.gather(1, classes), features)
