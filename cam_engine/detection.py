"""Object detectors explained per detection: torchvision's Faster R-CNN, RetinaNet, FCOS, SSD.

A torchvision detector returns one dict per image (``boxes`` (M_i, 4), ``scores`` (M_i,),
``labels`` (M_i,)). :func:`detector` splits it at a target layer and packs those dicts into one
tensor (B, M, 6) (:func:`pack_detections`), which :class:`cam_engine.targets.BoxScore` scores::

    frcnn = fasterrcnn_mobilenet_v3_large_320_fpn(...).eval()
    res = CAMEngine(detector(frcnn, "backbone.fpn.layer_blocks.0"))(x, BoxScore(labels, boxes))

Gradients go through the detector's boxes and scores (the box regression and the classifier),
down to the target map only. Class-agnostic methods (``eigencam``) need no target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .graph import HookCapture, find_module_output
from .model import CAMModel, SplitRunner

__all__ = ["detector", "default_layer", "pack_detections", "DetectorModel"]


def pack_detections(output: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """A torchvision detector's output as one tensor.

    Args:
        output: B dicts with ``boxes`` (M_i, 4) ``x1, y1, x2, y2``, ``scores`` (M_i,) and
            ``labels`` (M_i,).

    Returns:
        (B, M, 6) ``x1, y1, x2, y2, score, label`` in the boxes' dtype, M = max(M_i, 1); an
        image's rows past its M_i (and the one row of an image without detections) are zero
        boxes with score 0 and label -1. Boxes and scores keep their autograd graph.
    """
    if not isinstance(output, Sequence) or not all(isinstance(o, Mapping) for o in output):
        raise ValueError(
            "expected a detector's output, one dict of boxes / scores / labels per image; "
            f"got {type(output).__name__}"
        )
    rows = [
        torch.cat([o["boxes"], o["scores"][:, None], o["labels"][:, None].to(o["boxes"])], 1)
        for o in output
    ]
    width = max(1, *(len(r) for r in rows))
    padding = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    return torch.stack([torch.cat([r, padding.to(r).expand(width - len(r), 6)]) for r in rows])


class DetectorModel(CAMModel):
    """A detector split at ``target_layer`` by the forward-hook capture, its output packed by
    :func:`pack_detections` (see :class:`CAMModel` for the rest).

    Detectors branch on data (proposals, NMS, per-image loops): neither torch.fx nor
    ``torch.export`` traces them (export fails only after ~20 s on Faster R-CNN), so the
    capture is used from the start.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None) -> None:
        if target_layer is None:
            target_layer = default_layer(model)
        if not isinstance(target_layer, str):
            raise ValueError(f"target_layer must be a module name, got {target_layer!r}")
        super().__init__(model, target_layer, output=pack_detections)

    def _build(self, example: Tensor) -> SplitRunner:
        module = find_module_output(self.model, self._requested)
        note = "detectors are not traceable: forward-hook capture of the target layer"
        return SplitRunner(
            "hook", self._requested, hook=HookCapture(self.model, module), notes=[note]
        )


def default_layer(model: nn.Module) -> str:
    """The finest FPN level (``backbone.fpn.layer_blocks.0``: Faster / Mask / Keypoint R-CNN,
    RetinaNet, FCOS); SSDlite's first feature map (``backbone.features.0``, stride 16); SSD's
    VGG up to conv4_3 (``backbone.features``, stride 8)."""
    modules = dict(model.named_modules())
    if "backbone.fpn.layer_blocks.0" in modules:
        return "backbone.fpn.layer_blocks.0"
    # SSDlite runs the stages of its Sequential one by one: the Sequential itself never runs
    if isinstance(modules.get("backbone.features.0"), nn.Sequential):
        return "backbone.features.0"
    if "backbone.features" in modules:
        return "backbone.features"
    raise ValueError(
        "no default target layer for this detector (neither a torchvision FPN nor SSD "
        "backbone): pass target_layer= a module name whose output is a feature map"
    )


def detector(model: nn.Module, target_layer: str | None = None) -> DetectorModel:
    """``model`` (a torchvision detector in eval mode) split at ``target_layer`` (``None``:
    :func:`default_layer`), for :class:`cam_engine.CAMEngine`: its output is the packed
    detections (B, M, 6).

    The maps cover the detector's own input (its transform resizes and pads the images): give it
    images at the size it works at (``min_size``) for maps that fit them.
    """
    return DetectorModel(model, target_layer)
