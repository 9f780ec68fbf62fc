"""CAMEngine: forward, gradients, method and heatmaps of a batch in one call."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import methods, postprocess
from .layers import Reshape, check_reshape, gradients_to_nchw, to_nchw
from .model import CAMModel, CompileOptions, OutputSelector, select_output
from .targets import Resolved, Target, Targets, resolve

__all__ = ["CAMEngine", "CAMResult", "check_images", "score_gradients", "target_gradients"]


@dataclass
class CAMResult:
    """What one engine call returns; every tensor is on the input's device.

    Attributes:
        heatmaps: (B, K, H, W) float in [0, 1], upsampled to the input's size ((B, K, D, H, W)
            for volumes).
        cams: (B, K, h, w) method output after its ReLU, before normalisation and upsampling.
            At the input's size for methods defined there (``fullgrad``, guided methods) and for
            several target layers (the fused map); with ``aug_smooth`` the mean of the six
            normalised low-resolution maps.
        logits: (B, N) model scores (the selected model output, e.g. (B, N, H, W) for
            segmentation models).
        classes: (B, K) long, the class explained in each map (-1 for score functions).
        guided: (B, K, C, H, W) for ``guided-backprop`` / ``guided-gradcam``: the guided input
            gradient (times the Grad-CAM heatmap for ``guided-gradcam``); ``None`` otherwise.
    """

    heatmaps: Tensor
    cams: Tensor
    logits: Tensor
    classes: Tensor
    guided: Tensor | None = None


def check_images(x: Tensor, check_finite: bool = True, volumes: bool = False) -> None:
    """``ValueError`` unless ``x`` is a non-empty finite float batch (B, C, H, W).

    With ``volumes``, (B, C, D, H, W) batches are accepted too.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a tensor of images (B, C, H, W), got {type(x).__name__}")
    ranks = (4, 5) if volumes else (4,)
    if x.ndim not in ranks:
        hint = " (a single image? use x[None])" if x.ndim == 3 else ""
        shapes = "(B, C, H, W) or (B, C, D, H, W)" if volumes else "(B, C, H, W)"
        raise ValueError(f"expected images of shape {shapes}, got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x has 0 images")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images, got {x.dtype}; normalise them first")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values")


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


FUSIONS = ("mean", "max")
AUG_FACTORS = (0.9, 1.0, 1.1)  # pytorch-grad-cam's aug_smooth: ttach Multiply x HorizontalFlip


def _is_class_ids(targets: Targets | Resolved) -> bool:
    if isinstance(targets, Resolved):
        return targets.one_hot
    return not (isinstance(targets, Target) or callable(targets))


class CAMEngine:
    """Class-activation maps of a model, hook-free, one call per batch.

    Args:
        model: a classifier, or a :class:`CAMModel` from :func:`cam_engine.wrap`.
        target_layer: module or FX node name; ``None`` picks a default (see
            :attr:`target_layer` for the choice); a list of names fuses the per-layer heatmaps.
        method: one of :func:`cam_engine.methods.available`.
        reshape: layout of the target map: ``None`` (inferred), ``"vit"``, ``"swin"``,
            ``"none"`` or a callable returning (B, C, h, w).
        output: where the logits are in the model's output (index, key or callable).
        input_size: (H, W) used to choose the default layer.
        closed_form: use the closed-form gradient of global-average-pool -> linear heads.
        check_finite: reject inputs with NaN / inf (one reduction over the input).
        eigen_smooth: replace the channel sum by the first principal component of the weighted
            activations (pytorch-grad-cam's ``eigen_smooth``).
        aug_smooth: average the heatmaps of x and its horizontal flip, each times 0.9, 1.0 and 1.1
            (one batch of 6B images; pytorch-grad-cam's ``aug_smooth``). Targets are bound to
            the un-augmented images.
        fusion: how several target layers' maps are fused, each min-max normalised at its own
            resolution and upsampled (as pytorch-grad-cam does): ``"mean"`` (pytorch-grad-cam)
            or ``"max"``; the fused map is normalised again.
        batch_size: images (Score-CAM) or ablated maps (Ablation-CAM) per extra forward.
        method_options: method-specific keyword options (see each method's docstring).
        compile: run the trunk (up to the target layer, no autograd) through ``torch.compile``:
            ``True`` or a dict of its keyword arguments (see :class:`~cam_engine.CAMModel`).
            A :class:`~cam_engine.CAMModel` passed in brings its own (``wrap(..., compile=)``).
        channels_last: run the trunk on channels-last images: ``None`` on the CPU only (where it
            measured faster), ``True`` everywhere, ``False`` never (see
            :class:`~cam_engine.CAMModel`); a CAMModel passed in brings its own.

    Example::

        engine = CAMEngine(model, "layer4", method="gradcam")
        res = engine(x, targets=TopK(3))   # res.heatmaps: (B, 3, H, W)
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | Sequence[str] | None = None,
        method: str = "gradcam",
        *,
        reshape: Reshape = None,
        output: OutputSelector = None,
        input_size: tuple[int, int] = (224, 224),
        closed_form: bool = True,
        check_finite: bool = True,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        fusion: str = "mean",
        batch_size: int = 32,
        method_options: dict[str, Any] | None = None,
        compile: CompileOptions = False,
        channels_last: bool | None = None,
    ) -> None:
        layers = list(target_layer) if isinstance(target_layer, list | tuple) else [target_layer]
        if not layers:
            raise ValueError("target_layer=[] names no layer")
        if isinstance(model, CAMModel):
            if len(layers) > 1 or layers[0] not in (None, model.target_layer):
                raise ValueError(
                    f"the wrapped model is split at {model.target_layer!r}, not {target_layer!r}"
                )
            if compile is not False or channels_last is not None:
                raise ValueError(
                    "pass compile= and channels_last= to wrap(), which built this CAMModel"
                )
            self.models = [model]
        else:
            options = {"compile": compile, "channels_last": channels_last}
            self.models = [
                CAMModel(model, layer, output=output, input_size=input_size, **options)
                for layer in layers
            ]
        self.model = self.models[0]
        self.method = methods.get(method)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        if eigen_smooth and self.method.weighted is None:
            smoothable = [n for n in methods.available() if methods.get(n).weighted is not None]
            raise ValueError(
                f"method {method!r} has no eigen_smooth form; methods with one: "
                + ", ".join(smoothable)
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if aug_smooth and self.method.name.startswith("guided"):
            raise ValueError(f"aug_smooth is not defined for {method!r}")
        check_reshape(reshape)
        self.reshape = reshape
        self.closed_form = closed_form
        self.check_finite = check_finite
        self.eigen_smooth = eigen_smooth
        self.aug_smooth = aug_smooth
        self.fusion = fusion
        self.batch_size = batch_size
        self.method_options = dict(method_options or {})
        if self.method.needs_gap_head and any(m.gap_linear is None for m in self.models):
            raise ValueError(self._no_gap_message())
        if self.model.model.training:
            warnings.warn(
                "the model is in training mode: BatchNorm uses batch statistics and dropout is "
                "random, so maps are not deterministic; call model.eval() first",
                stacklevel=2,
            )

    @property
    def target_layer(self) -> str | list[str]:
        """The layer the maps are computed at (a list when several were given)."""
        names = [m.target_layer for m in self.models]
        return names[0] if len(names) == 1 else names

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
            x: (B, C, H, W) float images on the model's device, or (B, C, D, H, W) volumes.
            targets: what to explain (see :mod:`cam_engine.targets`).

        Returns:
            :class:`CAMResult` with K maps per image.
        """
        check_images(x, self.check_finite, volumes=True)
        if x.ndim == 5 and self.method.two_d_only:
            raise ValueError(f"method {self.method.name!r} is defined for 2-D images only")
        with torch.inference_mode(False):
            if x.is_inference():
                x = x.clone()
            if self.aug_smooth:
                return self._aug_smooth(x, targets)
            return self._explain(x, targets)

    def _explain(self, x: Tensor, targets: Targets | Resolved) -> CAMResult:
        size = tuple(x.shape[2:])
        layers = [self._layer(m, x, targets) for m in self.models]
        cams, logits, classes, guided = layers[0]
        with torch.no_grad():
            if len(layers) == 1:
                return CAMResult(postprocess.heatmaps(cams, size), cams, logits, classes, guided)
            # pytorch-grad-cam normalises each layer's map at its own resolution, then resizes;
            # with an interior maximum that is not the same as resizing first, so it is followed
            maps = torch.stack(
                [postprocess.upsample(postprocess.normalize(layer[0]), size) for layer in layers]
            )
            fused = maps.mean(0) if self.fusion == "mean" else maps.amax(0)
            return CAMResult(postprocess.normalize(fused), fused, logits, classes, guided)

    def _aug_smooth(self, x: Tensor, targets: Targets) -> CAMResult:
        batch = x.shape[0]
        with torch.no_grad():
            logits, _ = self.model(x)
        resolved = resolve(targets, logits)
        views = torch.cat([x * f for f in AUG_FACTORS] + [x.flip(-1) * f for f in AUG_FACTORS])
        rows = torch.arange(views.shape[0], device=x.device) % batch
        res = self._explain(views, resolved.take(rows))
        with torch.no_grad():

            def unaugment(maps: Tensor) -> Tensor:
                maps = maps.unflatten(0, (2, len(AUG_FACTORS), batch))
                return torch.cat([maps[0], maps[1].flip(-1)]).mean(0)

            heatmaps = postprocess.normalize(unaugment(res.heatmaps))
            cams = unaugment(postprocess.normalize(res.cams))
        return CAMResult(heatmaps, cams, logits, resolved.classes)

    def _layer(
        self, cam_model: CAMModel, x: Tensor, targets: Targets | Resolved
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(cams (B, K, *s), logits, classes (B, K), guided or None) at one target layer."""
        method = self.method
        resolved = targets if isinstance(targets, Resolved) else None
        one_hot = _is_class_ids(targets)
        gap, grads, head_graph = None, None, None
        if method.needs_head_graph:
            features, output, gap = cam_model.explain_forward(x, closed_form=False)
            head_graph = (features, output)
            resolved = resolved or resolve(targets, output.detach())
        elif method.uses_gradients:
            features, output, gap = cam_model.explain_forward(x, self.closed_form and one_hot)
            if method.needs_gap_head and gap is None:
                raise ValueError(self._no_gap_message())
            resolved = resolved or resolve(targets, output.detach())
            if gap is not None and self.closed_form and one_hot:
                grads = gap.gradients(resolved.classes, features)
            elif one_hot:
                grads = score_gradients(output, features, resolved.classes)
            else:
                rows = torch.arange(x.shape[0], device=x.device)
                grads = target_gradients(resolved.scores(output, rows), features)
        else:
            with torch.no_grad():
                output, features = cam_model(x)
            resolved = resolved or resolve(targets, output)
            built = cam_model.current(x)
            if built.gap is not None and built.gap.applies(features):
                gap = built.gap
        classes = resolved.classes
        with torch.no_grad():
            size = tuple(x.shape[2:])
            activations = to_nchw(features.detach(), self.reshape, size)
            if grads is not None:
                grads = gradients_to_nchw(grads, self.reshape, size)
        guided = None
        if method.needs_context:
            ctx = methods.Context(
                x=x,
                activations=activations,
                gradients=grads,
                classes=classes,
                logits=output.detach(),
                scores=resolved.scores,
                model=cam_model.model,
                cam_model=cam_model,
                head=_head_runner(cam_model, x),
                gap=gap if one_hot and self.closed_form else None,
                native=features.detach(),
                batch_size=self.batch_size,
                options=self.method_options,
                reshape=self.reshape,
                head_graph=head_graph,
            )
            cams = self._run(ctx)
            guided = ctx.guided
        else:
            with torch.no_grad():
                cams = self._run(activations, grads)
        cams = cams.expand(*classes.shape, *cams.shape[2:])  # class-agnostic maps: (B, 1, *s)
        return cams, output.detach(), classes, guided

    def _run(self, *args: Any) -> Tensor:
        if self.eigen_smooth:
            with torch.no_grad():
                return methods.first_component(self.method.weighted(*args)).relu()
        return self.method.fn(*args)


def _head_runner(cam_model: CAMModel, x: Tensor) -> Callable[[Tensor, Tensor], Any] | None:
    """``head(maps (n, *F), rows (n,)) -> output`` of the split's head, without autograd.

    The trunk values the head needs besides the map (a residual or class token crossing the cut)
    come from one more trunk pass, made only when the split has such values and on first use.
    """
    built = cam_model.current(x)
    if built.split is None:
        return None
    extras: list[Any] = []

    def head(maps: Tensor, rows: Tensor) -> Any:
        with torch.no_grad():
            if built.split.extras and not extras:
                extras.extend(built.run_trunk(x)[1:])
            picked = [
                e[rows] if isinstance(e, Tensor) and e.ndim and e.shape[0] == x.shape[0] else e
                for e in extras
            ]
            return select_output(built.split.head(maps, *picked), cam_model.output)

    return head
