"""CAMEngine: forward, gradients, method and heatmaps of a batch in one call.

The engine drives the pipeline of :mod:`cam_engine.explainer` (one method at one layer) and the
compositions of :mod:`cam_engine.compose` (several layers, ``aug_smooth``, meta-methods).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import compose, methods
from .explainer import CAMResult, LayerExplainer, LayerMaps, check_images, finish
from .layers import layer_name
from .layout import Reshape, check_reshape
from .methods import MethodOptions
from .model import CAMModel, CompileOptions, OutputSelector
from .targets import Resolved, Targets, resolve

__all__ = ["CAMEngine", "CAMResult", "check_images"]


class CAMEngine:
    """Class-activation maps of a model, hook-free, one call per batch.

    Args:
        model: a classifier, or a :class:`CAMModel` from :func:`cam_engine.wrap`.
        target_layer: module or FX node name, or a module of ``model`` (named by identity);
            ``None`` picks a default (see :attr:`target_layer` for the choice); a list of them
            fuses the per-layer heatmaps.
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
        method_options: the method's options: a dict of its keywords (or its options object,
            see each method's docstring); unknown keys and bad values raise ``ValueError`` here.
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
        target_layer: str | nn.Module | Sequence[str | nn.Module] | None = None,
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
        method_options: dict[str, Any] | MethodOptions | None = None,
        compile: CompileOptions = False,
        channels_last: bool | None = None,
    ) -> None:
        layers = list(target_layer) if isinstance(target_layer, list | tuple) else [target_layer]
        if not layers:
            raise ValueError("target_layer=[] names no layer")
        self.method = methods.get(method)
        self.options = self.method.options.parse(self.method.name, method_options)
        if fusion not in compose.FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; use one of {', '.join(compose.FUSIONS)}")
        if eigen_smooth and not self.method.smoothable:
            smoothable = [n for n in methods.available() if methods.get(n).smoothable]
            raise ValueError(
                f"method {method!r} has no eigen_smooth form; methods with one: "
                + ", ".join(smoothable)
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if aug_smooth and self.method.name.startswith("guided"):
            raise ValueError(f"aug_smooth is not defined for {method!r}")
        check_reshape(reshape)
        if isinstance(model, CAMModel):
            layers = [layer_name(model.model, layer) for layer in layers]
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
            settings = {"compile": compile, "channels_last": channels_last}
            self.models = [
                CAMModel(model, layer, output=output, input_size=input_size, **settings)
                for layer in layers
            ]
        #: the model split at the (first) target layer; ``cam_model.model`` is the user's model
        self.cam_model = self.models[0]
        self.reshape = reshape
        self.closed_form = closed_form
        self.check_finite = check_finite
        self.eigen_smooth = eigen_smooth
        self.aug_smooth = aug_smooth
        self.fusion = fusion
        self.batch_size = batch_size
        self._extra_layers: dict[str, CAMModel] = {}
        if self.method.composition:
            self.explainers: list[LayerExplainer] = []
        else:
            self.explainers = [
                self._explainer(m, self.method, self.options, eigen_smooth) for m in self.models
            ]
            if self.method.needs_gap_head and any(m.gap_linear is None for m in self.models):
                raise ValueError(self.explainers[0].no_gap_message())
        if self.cam_model.model.training:
            warnings.warn(
                "the model is in training mode: BatchNorm uses batch statistics and dropout is "
                "random, so maps are not deterministic; call model.eval() first",
                stacklevel=2,
            )

    @property
    def model(self) -> CAMModel:
        """The same as :attr:`cam_model` (the split model, not the user's), kept for old code."""
        return self.cam_model

    @property
    def target_layer(self) -> str | list[str]:
        """The layer the maps are computed at (a list when several were given)."""
        names = [m.target_layer for m in self.models]
        return names[0] if len(names) == 1 else names

    @property
    def split_kind(self) -> str:
        """How the model was split: ``"fx"``, ``"export"`` or ``"hook"``."""
        return self.cam_model.split_kind

    @property
    def method_options(self) -> MethodOptions:
        """The method's parsed options."""
        return self.options

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
                return compose.aug_smooth(
                    self._explain, self.cam_model.predict, lambda out: resolve(targets, out), x
                )
            return self._explain(x, targets)

    def _explain(self, x: Tensor, targets: Targets | Resolved) -> CAMResult:
        size = tuple(x.shape[2:])
        if self.method.composition:
            return self._compose(x, targets)
        layers = [explainer(x, targets) for explainer in self.explainers]
        if len(layers) == 1:
            return finish(layers[0], size)
        return compose.fuse_layers(layers, size, self.fusion)

    def _compose(self, x: Tensor, targets: Targets | Resolved) -> CAMResult:
        """A meta-method's maps: its composition over base calls, at each target layer."""
        size = tuple(x.shape[2:])
        logits = self.cam_model.predict(x)
        resolved = targets if isinstance(targets, Resolved) else resolve(targets, logits)
        results = []
        for cam_model in self.models:
            call = compose.Composition(
                x=x,
                targets=resolved,
                options=self.options,
                batch_size=self.batch_size,
                target_layer=cam_model.target_layer,
                base=lambda layer, m=cam_model: self._base(m, layer),
                predict=self.cam_model.predict,
            )
            cams = compose.COMPOSITIONS[self.method.name](call)
            cams = cams.expand(*resolved.classes.shape, *cams.shape[2:])
            results.append(LayerMaps(cams, logits, resolved.classes))
        if len(results) == 1:
            return finish(results[0], size)
        return compose.fuse_layers(results, size, self.fusion)

    def _base(self, cam_model: CAMModel, layer: str | None):
        """The meta-method's base at ``layer`` (``None``: ``cam_model``'s) as a call
        ``(x, targets) -> CAMResult``."""
        opts = self.options
        target = cam_model if layer is None else self._layer_model(layer)
        base = methods.get(opts.base)
        explainer = self._explainer(target, base, opts.base_options, opts.eigen_smooth)
        return lambda x, targets: finish(explainer(x, targets), tuple(x.shape[2:]))

    def _layer_model(self, layer: str) -> CAMModel:
        """The model split at another ``layer`` with this engine's settings, built once."""
        if layer not in self._extra_layers:
            outer = self.cam_model
            compiled = outer.compile_options
            self._extra_layers[layer] = CAMModel(
                outer.model,
                layer,
                output=outer.output,
                input_size=outer.input_size,
                compile=False if compiled is None else compiled,
                channels_last=outer.channels_last,
            )
        return self._extra_layers[layer]

    def _explainer(
        self, cam_model: CAMModel, method: methods.Method, options: MethodOptions, smooth: bool
    ) -> LayerExplainer:
        return LayerExplainer(
            cam_model,
            method,
            options,
            reshape=self.reshape,
            closed_form=self.closed_form,
            eigen_smooth=smooth,
            batch_size=self.batch_size,
        )
