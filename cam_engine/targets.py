"""What to explain: which classes' scores the maps are computed for.

``targets`` accepted by :class:`cam_engine.CAMEngine`:

- ``None``: the top-1 predicted class of each image (of a detector's packed detections
  (B, M, 6): its highest-scoring detection, see :class:`BoxScore`);
- an ``int`` (a NumPy integer, a 0-d integer tensor): that class for every image;
- a sequence, NumPy array or tensor of integers, (B,): one class per image, or (B, K): K classes
  per image (bools and floats are refused, not read as class ids);
- :class:`TopK` / :class:`BottomK`: the k highest / lowest scoring classes;
- a score target: :class:`SoftmaxScore`, :class:`ReSTScore`, :class:`BinaryScore`,
  :class:`SegmentationScore`, :class:`SimilarityScore`, :class:`BoxScore`, or any function
  ``output -> scores (B, K)`` (or (B,)) of the model's (selected) output.

Class ids are the fast path: their gradient is a one-hot ``grad_outputs`` (or, on
global-average-pool -> linear heads, the closed form); score targets take one backward of their
scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TopK",
    "BottomK",
    "Target",
    "SoftmaxScore",
    "ReSTScore",
    "BinaryScore",
    "SegmentationScore",
    "SimilarityScore",
    "BoxScore",
    "Targets",
    "Resolved",
    "is_class_ids",
    "resolve",
    "resolve_classes",
]


@dataclass(frozen=True)
class TopK:
    """The ``k`` highest-scoring classes of each image, best first."""

    k: int = 1


@dataclass(frozen=True)
class BottomK:
    """The ``k`` lowest-scoring classes of each image, lowest first."""

    k: int = 1


Scorer = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Resolved:
    """Targets bound to one batch.

    Attributes:
        classes: (B, K) class ids (-1 where a score function has none).
        scores: ``scores(output, rows) -> (n, K)``: the explained scores of a model output whose
            row ``i`` comes from image ``rows[i]`` (an augmented or perturbed copy of it).
        one_hot: the scores are ``output.gather(1, classes)`` (the fast gradient path).
    """

    classes: Tensor
    scores: Scorer
    one_hot: bool

    def take(self, rows: Tensor) -> Resolved:
        """The same targets for a batch whose row ``i`` is a copy of image ``rows[i]``."""
        return Resolved(self.classes[rows], lambda out, r: self.scores(out, rows[r]), self.one_hot)


class Target:
    """A score target: binds to a batch's output with :meth:`resolve`."""

    def resolve(self, output: Tensor) -> Resolved:
        """Classes and score function for the batch whose model output is ``output``."""
        raise NotImplementedError


def _gather(classes: Tensor) -> Scorer:
    return lambda out, rows: out.gather(1, classes[rows])


@dataclass(frozen=True)
class SoftmaxScore(Target):
    """The softmax probability of the classes chosen by ``targets`` (any class-id target).

    pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``.
    """

    targets: None | int | Sequence[int] | Tensor | TopK | BottomK = None

    def resolve(self, output: Tensor) -> Resolved:
        classes = resolve_classes(self.targets, output)
        return Resolved(classes, lambda out, rows: out.softmax(-1).gather(1, classes[rows]), False)


@dataclass(frozen=True)
class ReSTScore(Target):
    """The logit minus the cross-entropy of the classes chosen by ``targets`` (any class-id
    target): ``2 y_c - logsumexp(y)``, pre- and post-softmax together (Zhang et al., 2025).

    pytorch-grad-cam's ``ClassifierOutputReST``.
    """

    targets: None | int | Sequence[int] | Tensor | TopK | BottomK = None

    def resolve(self, output: Tensor) -> Resolved:
        classes = resolve_classes(self.targets, output)

        def scores(out: Tensor, rows: Tensor) -> Tensor:
            return 2 * out.gather(1, classes[rows]) - out.logsumexp(-1, keepdim=True)

        return Resolved(classes, scores, False)


@dataclass(frozen=True)
class BinaryScore(Target):
    """A single-logit (B,) or (B, 1) binary classifier: ``+logit`` for category 1, ``-logit`` for 0.

    pytorch-grad-cam's ``BinaryClassifierOutputTarget``.
    """

    category: int = 1

    def resolve(self, output: Tensor) -> Resolved:
        if output.shape[0] != output.numel():
            raise ValueError(
                f"BinaryScore needs one logit per image, got output of shape {tuple(output.shape)}"
            )
        sign = 1.0 if self.category == 1 else -1.0
        classes = torch.full((output.shape[0], 1), self.category, device=output.device)
        return Resolved(classes, lambda out, rows: sign * out.reshape(-1, 1), False)


@dataclass(frozen=True)
class SegmentationScore(Target):
    """Sum of a class channel's logits over a mask, for (B, N, H, W) segmentation outputs.

    pytorch-grad-cam's ``SemanticSegmentationTarget``.

    Attributes:
        category: an int, or one class per image (B,).
        mask: (H, W) for every image, or (B, H, W); bool or float weights.
    """

    category: int | Sequence[int] | Tensor
    mask: Tensor

    def resolve(self, output: Tensor) -> Resolved:
        if output.ndim != 4:
            raise ValueError(
                f"SegmentationScore needs (B, N, H, W) outputs, got {tuple(output.shape)}; "
                "select it with output= (e.g. output='out' for torchvision FCN / DeepLabV3)"
            )
        classes = resolve_classes(self.category, output.flatten(2).mean(-1))
        mask = torch.as_tensor(self.mask, device=output.device).to(output.dtype)
        if mask.shape[-2:] != output.shape[-2:]:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit outputs {tuple(output.shape)}"
            )
        mask = mask.expand(output.shape[0], *output.shape[-2:])

        def scores(out: Tensor, rows: Tensor) -> Tensor:
            picked = out.gather(1, classes[rows, :, None, None].expand(-1, -1, *out.shape[-2:]))
            return (picked * mask[rows, None]).sum(dim=(-2, -1))

        return Resolved(classes, scores, False)


@dataclass(frozen=True)
class SimilarityScore(Target):
    """Cosine similarity of the model's embedding to a concept embedding, for (B, D) outputs
    (retrieval, re-identification, CLIP-style image towers).

    pytorch-grad-cam's ``SimilarityToConceptTarget`` (its embeddings tutorial).

    Attributes:
        concept: (D,) for every image, or (B, D): one concept per image.
    """

    concept: Tensor

    def resolve(self, output: Tensor) -> Resolved:
        if output.ndim != 2:
            raise ValueError(
                f"SimilarityScore needs (B, D) embeddings, got outputs {tuple(output.shape)}"
            )
        concept = torch.as_tensor(self.concept, device=output.device)
        if not concept.is_floating_point() or concept.shape[-1:] != output.shape[1:]:
            raise ValueError(
                f"the concept must be a float (D,) or (B, D) tensor with D = {output.shape[1]}, "
                f"got {concept.dtype} {tuple(concept.shape)}"
            )
        if not bool(concept.isfinite().all()):
            raise ValueError("the concept has NaN or inf entries: its similarities would be NaN")
        if concept.ndim not in (1, 2) or (concept.ndim == 2 and len(concept) != len(output)):
            raise ValueError(
                f"concept of shape {tuple(concept.shape)} does not fit a batch of {len(output)}: "
                "give one (D,) for every image or (B, D), one per image"
            )
        concept = concept.to(output.dtype).expand_as(output)
        classes = torch.full((output.shape[0], 1), -1, dtype=torch.long, device=output.device)

        def scores(out: Tensor, rows: Tensor) -> Tensor:
            return F.cosine_similarity(out, concept[rows], dim=1)[:, None]

        return Resolved(classes, scores, False)


@dataclass(frozen=True)
class BoxScore(Target):
    """How well a detector's detections match given boxes: for each given box and label, the
    detection of highest IoU with it counts ``IoU + its score`` when the IoU is above
    ``iou_threshold`` and its label is the given one, else 0.

    pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``. The output it scores is the detections
    packed (B, M, 6) as :func:`cam_engine.detection.pack_detections` does (boxes ``x1, y1, x2,
    y2``, score, label; padding rows have label -1 and zero area).

    Attributes:
        labels: (n,) for every image, (B, n), or a list of B sequences (n_i,).
        boxes: (n, 4) for every image, (B, n, 4), or a list of B (n_i, 4); in the detector's
            input pixels, ``x2 > x1`` and ``y2 > y1``.
        iou_threshold: the IoU a detection must exceed to match.
        per_box: one map per given box (``K = n``, ``res.classes`` the labels; a list pads the
            shorter images with boxes that match nothing, so their maps are zeros) instead of
            one map for their sum (pytorch-grad-cam's).
    """

    labels: Sequence[int] | Sequence[Sequence[int]] | Tensor
    boxes: Tensor | Sequence[Tensor]
    iou_threshold: float = 0.5
    per_box: bool = False

    def __post_init__(self) -> None:
        threshold = self.iou_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"iou_threshold must be a number in [0, 1), got {threshold!r}")
        if not 0 <= threshold < 1:  # NaN fails too; at 1 or more no IoU could pass it
            raise ValueError(f"iou_threshold must be in [0, 1), got {threshold!r}")
        if not isinstance(self.per_box, bool):
            raise ValueError(f"per_box must be True or False, got {self.per_box!r}")

    def resolve(self, output: Tensor) -> Resolved:
        if output.ndim != 3 or output.shape[-1] != 6:
            raise ValueError(
                f"BoxScore needs detections (B, M, 6), got outputs {tuple(output.shape)}; explain "
                "the model wrapped by cam_engine.detection.detector(), whose output they are"
            )
        boxes, labels = _given_boxes(self.boxes, self.labels, output)
        threshold = self.iou_threshold

        def scores(out: Tensor, rows: Tensor) -> Tensor:
            iou = _box_iou(boxes[rows], out[..., :4])  # (n, boxes, M)
            best = iou.argmax(-1)
            matched_iou = iou.gather(-1, best[..., None])[..., 0]
            matched_label = out[..., 5].gather(-1, best)
            hit = (matched_iou > threshold) & (matched_label == labels[rows])
            got = torch.where(hit, matched_iou + out[..., 4].gather(-1, best), 0)
            return got if self.per_box else got.sum(-1, keepdim=True)

        if self.per_box:
            classes = labels.clamp_min(-1)
        else:
            classes = torch.full((output.shape[0], 1), -1, dtype=torch.long, device=output.device)
        return Resolved(classes, scores, False)


#: the label of the boxes padding a ragged list of given boxes: never a detection's label
_NO_LABEL = -2


def _given_boxes(boxes: object, labels: object, output: Tensor) -> tuple[Tensor, Tensor]:
    """BoxScore's boxes (B, n, 4) in ``output``'s dtype and labels (B, n) long; a ragged list
    padded with unit boxes labelled :data:`_NO_LABEL`."""
    batch, kwargs = output.shape[0], {"device": output.device}
    ragged = isinstance(boxes, list | tuple) and len(boxes) == batch
    if ragged and all(torch.as_tensor(b).ndim == 2 for b in boxes):  # not (n, 4) as lists
        sizes = [len(b) for b in boxes]
        if len(labels) != batch or any(len(lab) != n for lab, n in zip(labels, sizes, strict=True)):
            raise ValueError("BoxScore needs one label per box: labels and boxes do not match")
        width = max(sizes)
        unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=output.dtype, **kwargs)
        padded = unit.repeat(batch, width, 1)
        ids = torch.full((batch, width), _NO_LABEL, dtype=torch.long, **kwargs)
        for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
            padded[i, : sizes[i]] = torch.as_tensor(b, **kwargs).reshape(-1, 4)
            ids[i, : sizes[i]] = torch.as_tensor(lab, **kwargs)
        boxes, labels = padded, ids
    boxes = torch.as_tensor(boxes, **kwargs)
    labels = _stacked(labels, kwargs["device"])
    if boxes.ndim == 2:
        boxes = boxes.expand(batch, *boxes.shape)
    if labels.ndim == 1:
        labels = labels.expand(batch, *labels.shape)
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes of shape {tuple(boxes.shape)} do not fit a batch of {batch}: give (n, 4), "
            "(B, n, 4) or a list of B (n_i, 4)"
        )
    if labels.shape != boxes.shape[:2] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"BoxScore needs one integer label per box: labels {tuple(labels.shape)} "
            f"for boxes {tuple(boxes.shape)}"
        )
    if not bool((boxes[..., 2:] > boxes[..., :2]).all()):
        raise ValueError("boxes must be x1, y1, x2, y2 with x2 > x1 and y2 > y1")
    return boxes.to(output.dtype), labels.long()


def _top_detection(detections: Tensor) -> Resolved:
    """``None`` for a detector's packed detections (B, M, 6): each image's highest-scoring
    detection, as a per-box :class:`BoxScore` (an image without detections gets a zero map)."""
    top = detections.gather(1, detections[..., 4:5].argmax(1, keepdim=True).expand(-1, -1, 6))
    found = top[..., 5] >= 0  # (B, 1); padding rows have label -1
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=top.dtype, device=top.device)
    boxes = torch.where(found[..., None], top[..., :4], unit)
    labels = torch.where(found, top[..., 5].long(), _NO_LABEL)
    return BoxScore(labels, boxes, per_box=True).resolve(detections)


def _stacked(items: object, device: torch.device) -> Tensor:
    """``items`` as one tensor: a nested sequence of numbers, or a sequence of tensors or
    arrays of one length (what a detector's ``labels`` per image are)."""
    try:
        return torch.as_tensor(items, device=device)
    except (TypeError, ValueError, RuntimeError):  # a list of tensors with several elements each
        try:
            return torch.stack([torch.as_tensor(item, device=device) for item in items])
        except (TypeError, RuntimeError):
            raise ValueError(
                f"BoxScore needs one integer label per box, got labels {items!r:.80}"
            ) from None


def _box_iou(boxes: Tensor, other: Tensor) -> Tensor:
    """``torchvision.ops.box_iou``, batched: (B, n, 4) and (B, M, 4) -> (B, n, M)."""

    def area(b: Tensor) -> Tensor:
        return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])

    top_left = torch.max(boxes[..., :, None, :2], other[..., None, :, :2])
    bottom_right = torch.min(boxes[..., :, None, 2:], other[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / (area(boxes)[..., :, None] + area(other)[..., None, :] - inter)


@dataclass(frozen=True)
class _ScoreFunction(Target):
    fn: Callable[[Tensor], Tensor]

    def resolve(self, output: Tensor) -> Resolved:
        def scores(out: Tensor, rows: Tensor) -> Tensor:
            got = self.fn(out)
            if not isinstance(got, Tensor) or got.ndim not in (1, 2) or len(got) != len(out):
                raise ValueError(
                    "a score function must map the output to scores (B, K) or (B,), got "
                    f"{getattr(got, 'shape', type(got).__name__)} for a batch of {out.shape[0]}"
                )
            got = got.reshape(out.shape[0], -1)
            _check_finite(got, rows)
            return got

        k = scores(output, torch.arange(output.shape[0], device=output.device)).shape[1]
        classes = torch.full((output.shape[0], k), -1, dtype=torch.long, device=output.device)
        return Resolved(classes, scores, False)


def _check_finite(scores: Tensor, rows: Tensor) -> None:
    """Refuse NaN / inf scores (n, K) of images ``rows``: their gradients make all-NaN maps."""
    bad = ~torch.isfinite(scores.detach())
    if bad.any():
        row, k = (int(i) for i in bad.nonzero()[0])
        count = int(bad.sum())
        raise ValueError(
            f"the score function returned {count} non-finite score{'s' if count > 1 else ''} "
            f"({float(scores.detach()[row, k])} for image {int(rows[row])}, target {k}"
            f"{', the first' if count > 1 else ''}); scores must be finite"
        )


Targets = (
    None
    | int
    | Sequence[int]
    | np.ndarray
    | Tensor
    | TopK
    | BottomK
    | Target
    | Callable[[Tensor], Tensor]
)


def is_class_ids(targets: Targets | Resolved) -> bool:
    """Whether ``targets`` select class ids, whose scores are entries of the logits: their
    gradient is a one-hot ``grad_outputs`` (or, on global-average-pool -> linear heads, the closed
    form). False for score targets (a :class:`Target` or a function). A :class:`Resolved` says
    it with ``one_hot``. Class ids that are malformed are still class ids here;
    :func:`resolve_classes` refuses them.
    """
    if isinstance(targets, Resolved):
        return targets.one_hot
    return not (isinstance(targets, Target) or callable(targets))


def resolve(targets: Targets, output: Tensor) -> Resolved:
    """Bind ``targets`` to a batch's model output (detached: only classes are read here).

    A plain function is applied to the whole output of each batch, so it must not depend on
    which images the rows are (subclass :class:`Target` for per-image targets). Its scores must be
    finite (``ValueError`` otherwise).
    """
    if isinstance(targets, Target):
        return targets.resolve(output)
    if not is_class_ids(targets):
        return _ScoreFunction(targets).resolve(output)
    if targets is None and output.ndim == 3 and output.shape[-1] == 6:
        return _top_detection(output.detach())
    if output.ndim != 2:
        raise ValueError(
            f"class-id targets need (B, N) logits, the model outputs {tuple(output.shape)}; "
            "pass a score target (e.g. SegmentationScore) or a function output -> (B, K)"
        )
    classes = resolve_classes(targets, output)
    return Resolved(classes, _gather(classes), True)


def _ranked(logits: Tensor, k: int, largest: bool) -> Tensor:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > logits.shape[1]:
        raise ValueError(f"k={k} is larger than the number of classes ({logits.shape[1]})")
    return logits.topk(k, dim=1, largest=largest).indices


_ACCEPTED = (
    "targets must be None, a class id (an int), class ids (B,) or (B, K) as a sequence, NumPy "
    "array or tensor of ints, TopK / BottomK, a Target, or a function output -> scores (B, K)"
)
_BOOL = "class ids must be integers, not bools (True / False are not read as classes 1 / 0)"
_INT64 = torch.iinfo(torch.long)


def _out_of_range(index: int, num_classes: int) -> ValueError:
    return ValueError(f"class index {index} out of range for {num_classes} classes")


def _check_items(item: object, num_classes: int) -> None:
    """Refuse what ``torch.as_tensor`` would misread as class ids: bools as 0 / 1, floats,
    strings and containers other than sequences; ints past int64 overflow it."""
    if isinstance(item, bool | np.bool_):
        raise ValueError(f"{_BOOL}: got {item!r}")
    if isinstance(item, int | np.integer):
        if not _INT64.min <= item <= _INT64.max:
            raise _out_of_range(int(item), num_classes)
    elif isinstance(item, float | np.floating):
        raise ValueError(f"class ids must be integers, got {type(item).__name__} {item!r}")
    elif isinstance(item, Sequence) and not isinstance(item, str | bytes):
        for sub in item:
            _check_items(sub, num_classes)
    elif not isinstance(item, Tensor | np.ndarray):  # arrays: their dtype is checked whole
        raise ValueError(f"{_ACCEPTED}; got {type(item).__name__} {item!r:.60}")


def resolve_classes(targets: Targets, logits: Tensor) -> Tensor:
    """Class ids to explain.

    Args:
        targets: see the module docstring (class-id targets only).
        logits: (B, N) scores of the batch.

    Returns:
        (B, K) long tensor on ``logits``' device.

    Raises:
        ValueError: for anything else (a string, a dict or set, bools, floats), ids out of
            [0, N), a shape other than (), (B,) or (B, K), or K = 0.
    """
    batch, num_classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1, keepdim=True)
    if isinstance(targets, TopK | BottomK):
        return _ranked(logits, targets.k, largest=isinstance(targets, TopK))
    _check_items(targets, num_classes)
    classes = torch.as_tensor(targets, device=logits.device)
    if classes.dtype == torch.bool:
        raise ValueError(f"{_BOOL}: got dtype {classes.dtype}")
    if classes.is_floating_point() or classes.is_complex():
        raise ValueError(f"class ids must be integers, got dtype {classes.dtype}")
    shape = tuple(classes.shape)
    if classes.ndim == 0:
        classes = classes.repeat(batch)
    if classes.ndim == 1:
        classes = classes[:, None]
    if classes.ndim != 2 or classes.shape[0] != batch:
        raise ValueError(
            f"targets of shape {shape} do not fit a batch of {batch}: "
            "give one class for all (an int), one per image (B,) or K per image (B, K)"
        )
    if classes.shape[1] == 0:
        raise ValueError("targets select no class (K = 0)")
    classes = classes.long()
    out_of_range = (classes < 0) | (classes >= num_classes)
    if out_of_range.any():
        raise _out_of_range(int(classes[out_of_range][0]), num_classes)
    return classes
