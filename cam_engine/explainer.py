"""One method at one target layer: the pipeline of a batch, stage by stage.

    x --split--> ForwardRecord --targets--> Resolved --gradients--> G --method--> cams

Each stage runs under a ``torch.profiler.record_function`` label (:data:`STAGES`), so
``torch.profiler`` (and ``cam-engine profile``) sees where the time of any method goes. The
compositions (several layers, augmentations, meta-methods) run :class:`LayerExplainer` calls from
:mod:`cam_engine.compose`; :class:`cam_engine.CAMEngine` drives both.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from . import postprocess
from .gradients import ForwardRecord, explained_gradients, forward_record
from .heads import gap_linear_message
from .layout import Reshape, gradients_to_nchw, to_nchw
from .methods import Context, Method, MethodOptions
from .model import CAMModel, select_output
from .targets import Resolved, Targets, is_class_ids, resolve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CAMResult", "LayerMaps", "LayerExplainer", "check_images", "finish", "STAGES"]

#: profiler labels of the stages, in pipeline order (``cam-engine profile`` reads them)
STAGES = (
    "trunk forward (no grad)",
    "head forward",
    "forward (hook capture)",
    "targets",
    "gradient (closed form)",
    "backward (head only)",
    "method",
    "upsample + normalise",
)


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

    def show(
        self,
        images: Tensor | None = None,
        labels: Sequence[str] | None = None,
        *,
        colormap: str = "jet",
        alpha: float = 0.5,
        max_images: int = 8,
        max_maps: int = 8,
    ) -> Figure:
        """A matplotlib figure: one row per image, the image then its overlays, each titled
        with its class's name and probability (``"cat p=0.870"``).

        Args:
            images: (B, 3, H, W) RGB, uint8 or floating point in [0, 1], the heatmaps' size
                (the images before normalisation); ``None``: the heatmaps alone, coloured.
            labels: class names by id (``None``: ``"class 17"``).
            colormap, alpha: as :func:`cam_engine.overlay`.
            max_images, max_maps: how many images, and maps of each, are drawn at most.

        Returns:
            A ``matplotlib.figure.Figure``, made without pyplot (no backend needed; a notebook
            shows it once): ``res.show(images).savefig("cams.png")``.
        """
        # display sits at the output edge with io (PIL, matplotlib): loaded when a result is shown
        from .display import figure

        return figure(
            self.heatmaps,
            self.classes,
            self.logits,
            images,
            labels,
            colormap=colormap,
            alpha=alpha,
            max_images=max_images,
            max_maps=max_maps,
        )

    def _repr_html_(self) -> str:
        """Jupyter's view of a result: its shapes and its first heatmaps, coloured, as one
        small inline PNG (see :func:`cam_engine.display.preview_html`)."""
        from .display import preview_html

        return preview_html(self.heatmaps, self.classes, self.logits)


@dataclass(frozen=True)
class LayerMaps:
    """One layer's maps before postprocessing: ``cams`` (B, K, *s), ``logits``, ``classes``
    (B, K) and the guided gradients of guided methods."""

    cams: Tensor
    logits: Tensor
    classes: Tensor
    guided: Tensor | None = None


def finish(maps: LayerMaps, size: tuple[int, ...]) -> CAMResult:
    """Heatmaps of one layer's maps at the input ``size``: upsampled, then min-max normalised."""
    with record_function("upsample + normalise"), torch.no_grad():
        heatmaps = postprocess.heatmaps(maps.cams, size)
    return CAMResult(heatmaps, maps.cams, maps.logits, maps.classes, maps.guided)


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
    # NaN propagates through min and max, and an inf is one of them: 4x faster than isfinite
    if check_finite and x.numel() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():
        raise ValueError("x contains NaN or inf values")


class _SplitAccess:
    """:class:`cam_engine.methods.SplitAccess` of one batch ``x`` over a :class:`CAMModel`."""

    def __init__(self, cam_model: CAMModel, x: Tensor) -> None:
        self.model = cam_model.model
        self.target_layer = cam_model.target_layer
        self._cam_model, self._x = cam_model, x
        self._extras: list[Any] | None = None

    def predict(self, inputs: Tensor) -> Tensor:
        return self._cam_model.predict(inputs)

    def head(self, maps: Tensor, rows: Tensor) -> Tensor:
        # the trunk values the head needs besides the map (a residual or class token crossing
        # the cut) come from one more trunk pass, made only when the split has such values
        runner = self._cam_model.current(self._x)
        if runner.split is None:
            raise ValueError(
                "this method reruns the head on modified maps, which needs a traced split "
                "(torch.fx / torch.export); the model was split with a forward hook"
            )
        x = self._x
        with torch.no_grad():
            if self._extras is None:
                self._extras = list(runner.trunk(x)[1:]) if runner.split.extras else []
            picked = [
                e[rows] if isinstance(e, Tensor) and e.ndim and e.shape[0] == x.shape[0] else e
                for e in self._extras
            ]
            return self.select(runner.head(maps, *picked))

    def record(self, inputs: Tensor, *, closed_form: bool) -> ForwardRecord:
        return forward_record(self._cam_model, inputs, closed_form=closed_form, class_ids=True)

    def select(self, output: Any) -> Tensor:
        return select_output(output, self._cam_model.output)


class LayerExplainer:
    """A method at one split: ``explainer(x, targets) -> LayerMaps``.

    Args:
        cam_model: the model split at the target layer.
        method: the registered method (not a composition).
        options: the method's parsed options.
        reshape: layout of the target map (see :func:`cam_engine.layout.to_nchw`).
        closed_form: use the closed-form gradient of global-average-pool -> linear heads.
        eigen_smooth: first principal component of the weighted activations instead of the sum.
        batch_size: extra inputs per forward of perturbation methods.
    """

    def __init__(
        self,
        cam_model: CAMModel,
        method: Method,
        options: MethodOptions,
        *,
        reshape: Reshape = None,
        closed_form: bool = True,
        eigen_smooth: bool = False,
        batch_size: int = 32,
    ) -> None:
        if method.composition:
            raise ValueError(f"{method.name!r} composes other calls; use CAMEngine")
        self.cam_model, self.method, self.options = cam_model, method, options
        self.reshape, self.closed_form = reshape, closed_form
        self.eigen_smooth, self.batch_size = eigen_smooth, batch_size

    def no_gap_message(self) -> str:
        """Why ``method="cam"`` (a method that needs a GAP -> linear head) cannot run here."""
        split = self.cam_model.current().split
        head = None if split is None else split.head
        return gap_linear_message(head, self.cam_model.target_layer, self.method.name)

    def _layout(self, x: Tensor) -> Reshape:
        """The target map's layout for images ``x``: ``reshape`` when given, else ``"swin"``
        where the head pools the map as channels-last (what the head does beats a guess from the
        map's shape, which cannot tell (B, h, w, C) from (B, C, h, w) when ``w`` and ``C`` fit
        the image's aspect), else ``None`` (inferred)."""
        # current(x): the split this forward ran (a torch.export split is per input shape)
        gap = self.cam_model.current(x).gap if self.reshape is None else None
        return "swin" if gap is not None and gap.channels_last else self.reshape

    def __call__(self, x: Tensor, targets: Targets | Resolved) -> LayerMaps:
        """The maps of one batch ``x`` (B, C, *S) for ``targets``: :class:`LayerMaps`."""
        method, class_ids = self.method, is_class_ids(targets)
        # the attention kernel is picked when the graph is built: the fused ones have no
        # double backward
        kernels = sdpa_kernel(SDPBackend.MATH) if method.double_backward else nullcontext()
        with kernels:
            record = forward_record(
                self.cam_model,
                x,
                closed_form=self.closed_form and not method.needs_head_graph,
                class_ids=class_ids,
                graph=method.needs_gradients or method.needs_head_graph,
            )
        if method.needs_gap_head:  # the head's structure, whether its closed form is used or not
            gap = self.cam_model.gap_linear
            if gap is None or not gap.applies(record.features):
                raise ValueError(self.no_gap_message())
        with record_function("targets"):
            resolved = targets if isinstance(targets, Resolved) else resolve(targets, record.output)
        grads = None
        if method.needs_gradients:
            label = "backward (head only)" if record.has_graph else "gradient (closed form)"
            with record_function(label):
                grads = explained_gradients(record, resolved)
        with record_function("method"):
            size, reshape = tuple(x.shape[2:]), self._layout(x)
            with torch.no_grad():
                activations = to_nchw(record.features.detach(), reshape, size)
                if grads is not None:
                    grads = gradients_to_nchw(grads, reshape, size)
            ctx = Context(
                x=x,
                activations=activations,
                gradients=grads,
                targets=resolved,
                logits=record.output.detach(),
                native=record.features.detach(),
                options=self.options,
                batch_size=self.batch_size,
                reshape=reshape,
                split=_SplitAccess(self.cam_model, x),
                closed_form=record.closed_form,
                head_graph=record if method.needs_head_graph else None,
            )
            if self.eigen_smooth:
                with torch.no_grad():
                    out_cams, guided = method.eigen_smoothed(ctx), None
            else:
                out = method.run(ctx)
                out_cams, guided = out.cams, out.guided
        classes = resolved.classes
        cams = out_cams.expand(*classes.shape, *out_cams.shape[2:])  # class-agnostic: (B, 1, *s)
        return LayerMaps(cams, record.output.detach(), classes, guided)
