"""CAMEngine: forward, gradients, method and heatmaps of a batch in one call."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import methods, postprocess
from .layers import Reshape, check_reshape, to_nchw
from .model import CAMModel, OutputSelector
from .targets import Targets, resolve_classes

__all__ = ["CAMEngine", "CAMResult", "check_images", "score_gradients"]


@dataclass
class CAMResult:
    """What one engine call returns; every tensor is on the input's device.

    Attributes:
        heatmaps: (B, K, H, W) float in [0, 1], upsampled to the input's size.
        cams: (B, K, h, w) method output after its ReLU, before normalisation and upsampling.
        logits: (B, N) model scores.
        classes: (B, K) long, the class explained in each map.
    """

    heatmaps: Tensor
    cams: Tensor
    logits: Tensor
    classes: Tensor


def check_images(x: Tensor, check_finite: bool = True) -> None:
    """``ValueError`` unless ``x`` is a non-empty finite float batch (B, C, H, W)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a tensor of images (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (a single image? use x[None])" if x.ndim == 3 else ""
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x has 0 images")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images, got {x.dtype}; normalise them first")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values")


def score_gradients(logits: Tensor, features: Tensor, classes: Tensor) -> Tensor:
    """dScore/dA for every explained class, by ``torch.autograd.grad`` only down to ``A``.

    Args:
        logits: (B, N) scores depending on ``features`` through the head.
        features: the target map, a leaf that requires grad: (B, *F).
        classes: (B, K) class ids.

    Returns:
        (B, K, *F). The K targets are one call: batched one-hot ``grad_outputs``.
    """
    scores = logits.gather(1, classes)
    k = classes.shape[1]
    if k == 1:
        (grads,) = torch.autograd.grad(scores, features, torch.ones_like(scores))
        return grads[:, None]
    one_hot = torch.eye(k, dtype=scores.dtype, device=scores.device)[:, None, :]
    (grads,) = torch.autograd.grad(
        scores, features, one_hot.expand(k, *scores.shape), is_grads_batched=True
    )
    return grads.movedim(0, 1)


class CAMEngine:
    """Class-activation maps of a model, hook-free, one call per batch.

    Args:
        model: a classifier, or a :class:`CAMModel` from :func:`cam_engine.wrap`.
        target_layer: module or FX node name; ``None`` picks a default (see
            :attr:`target_layer` for the choice).
        method: one of :func:`cam_engine.methods.available`.
        reshape: layout of the target map: ``None`` (inferred), ``"vit"``, ``"swin"``,
            ``"none"`` or a callable returning (B, C, h, w).
        output: where the logits are in the model's output (index, key or callable).
        input_size: (H, W) used to choose the default layer.
        closed_form: use the closed-form gradient of global-average-pool -> linear heads.
        check_finite: reject inputs with NaN / inf (one reduction over the input).

    Example::

        engine = CAMEngine(model, "layer4", method="gradcam")
        res = engine(x, targets=TopK(3))   # res.heatmaps: (B, 3, H, W)
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None = None,
        method: str = "gradcam",
        *,
        reshape: Reshape = None,
        output: OutputSelector = None,
        input_size: tuple[int, int] = (224, 224),
        closed_form: bool = True,
        check_finite: bool = True,
    ) -> None:
        if isinstance(model, CAMModel):
            if target_layer is not None and target_layer != model.target_layer:
                raise ValueError(
                    f"the wrapped model is split at {model.target_layer!r}, not {target_layer!r}"
                )
            self.model = model
        else:
            self.model = CAMModel(model, target_layer, output=output, input_size=input_size)
        self.method = methods.get(method)
        check_reshape(reshape)
        self.reshape = reshape
        self.closed_form = closed_form
        self.check_finite = check_finite
        if self.method.needs_gap_head and self.model.gap_linear is None:
            raise ValueError(self._no_gap_message())
        if self.model.model.training:
            warnings.warn(
                "the model is in training mode: BatchNorm uses batch statistics and dropout is "
                "random, so maps are not deterministic; call model.eval() first",
                stacklevel=2,
            )

    @property
    def target_layer(self) -> str:
        """The layer the maps are computed at."""
        return self.model.target_layer

    @property
    def split_kind(self) -> str:
        """How the model was split: ``"fx"``, ``"export"`` or ``"hook"``."""
        return self.model.split_kind

    def _no_gap_message(self) -> str:
        return (
            f"method {self.method.name!r} needs a head that is global average pooling -> "
            f"(flatten / dropout) -> linear after {self.target_layer!r}, and this model's is not "
            "(or dropout is active, or the pooling does not cover the whole map); "
            "use method='gradcam'"
        )

    def __call__(self, x: Tensor, targets: Targets = None) -> CAMResult:
        """Explain a batch.

        Args:
            x: (B, C, H, W) float images on the model's device.
            targets: what to explain (see :mod:`cam_engine.targets`).

        Returns:
            :class:`CAMResult` with K maps per image.
        """
        check_images(x, self.check_finite)
        with torch.inference_mode(False):
            if x.is_inference():
                x = x.clone()
            features, logits, gap = self.model.explain_forward(x, self.closed_form)
            if self.method.needs_gap_head and gap is None:
                raise ValueError(self._no_gap_message())
            classes = resolve_classes(targets, logits.detach())
            if gap is not None and self.closed_form:
                grads = gap.gradients(classes, features)
            else:
                grads = score_gradients(logits, features, classes)
            with torch.no_grad():
                size = tuple(x.shape[2:])
                activations = to_nchw(features.detach(), self.reshape, size)
                grads = to_nchw(grads.flatten(0, 1), self.reshape, size)
                cams = self.method.fn(activations, grads.unflatten(0, classes.shape))
                heatmaps = postprocess.heatmaps(cams, size)
        return CAMResult(heatmaps, cams, logits.detach(), classes)
