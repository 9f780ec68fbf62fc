"""pytorch-grad-cam's call shapes on top of :class:`cam_engine.CAMEngine`: switch in one line.

``from pytorch_grad_cam import GradCAM`` becomes ``from cam_engine.compat import GradCAM``; the
rest of a pytorch-grad-cam script runs as it is::

    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        grayscale_cam = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)])  # (B, H, W)
    visualization = show_cam_on_image(rgb_img, grayscale_cam[0], use_rgb=True)

Target layers are modules (found in the model by identity); several are fused by the engine's
mean, as pytorch-grad-cam averages them. Targets are pytorch-grad-cam's target objects (from
``pytorch_grad_cam.utils.model_targets`` or the equivalents here), one per image.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .engine import CAMEngine
from .layers import layer_name
from .postprocess import colormap_lut
from .targets import Resolved, SoftmaxScore, Target, Targets

#: pytorch-grad-cam's aug_smooth scales each image and its horizontal flip by these
_AUG_FACTORS = (0.9, 1.0, 1.1)

__all__ = [
    "ClassifierOutputTarget",
    "ClassifierOutputSoftmaxTarget",
    "show_cam_on_image",
    "BaseCAM",
    "engine_targets",
    "METHODS",
    "GradCAM",
    "HiResCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "EigenCAM",
    "EigenGradCAM",
    "ScoreCAM",
    "AblationCAM",
    "FullGrad",
    "KPCA_CAM",
    "FEM",
    "ShapleyCAM",
    "FinerCAM",
    "RefineCAM",
    "SESS",
]


class ClassifierOutputTarget:
    """The logit of ``category`` (pytorch-grad-cam's class of the same name)."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        """(N,) -> its ``category`` entry; (B, N) -> (B,)."""
        if model_output.ndim == 1:
            return model_output[self.category]
        return model_output[:, self.category]


class ClassifierOutputSoftmaxTarget:
    """The softmax probability of ``category`` (pytorch-grad-cam's class of the same name)."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        """(N,) -> the probability of ``category``; (B, N) -> (B,)."""
        if model_output.ndim == 1:
            return torch.softmax(model_output, dim=-1)[self.category]
        return torch.softmax(model_output, dim=-1)[:, self.category]


def _target_kind(target: object) -> str:
    """``"logit"``, ``"softmax"`` or ``"other"``: ours or pytorch-grad-cam's (when imported).

    pytorch-grad-cam's classes are looked up in ``sys.modules``: a script that made one has
    imported the package, and one that did not need not have it installed.
    """
    pgc = sys.modules.get("pytorch_grad_cam.utils.model_targets")
    kinds = {ClassifierOutputTarget: "logit", ClassifierOutputSoftmaxTarget: "softmax"}
    if pgc is not None:
        kinds[pgc.ClassifierOutputTarget] = "logit"
        kinds[pgc.ClassifierOutputSoftmaxTarget] = "softmax"
    return kinds.get(type(target), "other")


class _PerImage(Target):
    """One pytorch-grad-cam target per image, each called on its image's output row."""

    def __init__(self, targets: Sequence[Callable[[Tensor], Tensor]]) -> None:
        self.targets = list(targets)

    def resolve(self, output: Tensor) -> Resolved:
        def scores(out: Tensor, rows: Tensor) -> Tensor:
            # pytorch-grad-cam sums target(row) over the batch: a score per row, (n, 1)
            return torch.stack(
                [self.targets[int(r)](row).reshape(()) for row, r in zip(out, rows, strict=True)]
            ).unsqueeze(1)

        classes = torch.full((output.shape[0], 1), -1, dtype=torch.long, device=output.device)
        return Resolved(classes, scores, False)


def engine_targets(targets: Sequence[Callable[[Tensor], Tensor]] | None, batch: int) -> Targets:
    """pytorch-grad-cam ``targets`` (one per image, or ``None``) as :class:`CAMEngine` targets.

    All :class:`ClassifierOutputTarget`: class ids (the engine's fast path); all
    :class:`ClassifierOutputSoftmaxTarget`: :class:`~cam_engine.targets.SoftmaxScore`; any other
    mix: each target called on its image's output row, as pytorch-grad-cam does.

    Raises:
        ValueError: not one target per image.
    """
    if targets is None:
        return None
    targets = list(targets)
    if len(targets) != batch:
        raise ValueError(
            f"targets must be one per image: {len(targets)} targets for a batch of {batch}"
        )
    kinds = {_target_kind(t) for t in targets}
    if kinds == {"logit"}:
        return [int(t.category) for t in targets]
    if kinds == {"softmax"}:
        return SoftmaxScore([int(t.category) for t in targets])
    return _PerImage(targets)


class BaseCAM:
    """A pytorch-grad-cam method object running on :class:`cam_engine.CAMEngine`.

    Args:
        model: the classifier. As pytorch-grad-cam does, it is put in eval mode.
        target_layers: modules of ``model``; several are fused by their mean.
        reshape_transform: pytorch-grad-cam's reshape (activation -> (B, C, h, w)); ``None``: the
            engine infers token and channels-last layouts.
        base_method: for FinerCAM, RefineCAM and SESS, the base method's class (from here or
            from pytorch-grad-cam, matched by name).
        **engine_options: more :class:`CAMEngine` keywords (``batch_size``, ``method_options``,
            ``compile``, ...).
    """

    method = ""

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
        base_method: type | None = None,
        **engine_options: Any,
    ) -> None:
        self.model = model.eval()
        self.target_layers = list(target_layers)
        self._layers = [layer_name(model, layer) for layer in self.target_layers]
        layer, method_options = self._engine_layers(self._layers)
        if base_method is not None:
            if base_method.__name__ not in METHODS:
                raise ValueError(
                    f"unknown base_method {base_method.__name__!r}; use one of {sorted(METHODS)}"
                )
            method_options["base"] = METHODS[base_method.__name__]
        options = dict(engine_options)
        if method_options:
            options["method_options"] = {**(options.get("method_options") or {}), **method_options}
        self._options = {"reshape": reshape_transform, **options}
        self._layer = layer
        self._engines: dict[bool, CAMEngine] = {}
        self.outputs: Tensor | None = None
        self._engine(False)  # a bad layer, option or method fails here, not at the call

    def _engine_layers(self, names: list[str]) -> tuple[str | list[str] | None, dict[str, Any]]:
        """The engine's ``target_layer`` and method options for pytorch-grad-cam's layers:
        several layers' maps are fused by their mean."""
        if not names:
            raise ValueError(
                "target_layers is empty: pass the modules to explain, e.g. [model.layer4]"
            )
        return (names[0] if len(names) == 1 else names), {}

    def _engine(self, eigen_smooth: bool) -> CAMEngine:
        if eigen_smooth not in self._engines:
            self._engines[eigen_smooth] = CAMEngine(
                self.model, self._layer, self.method, eigen_smooth=eigen_smooth, **self._options
            )
        return self._engines[eigen_smooth]

    def __call__(
        self,
        input_tensor: Tensor,
        targets: Sequence[Callable[[Tensor], Tensor]] | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        """Heatmaps of a batch, as pytorch-grad-cam returns them.

        Args:
            input_tensor: (B, C, H, W) images; moved to the model's device.
            targets: one target per image (``ClassifierOutputTarget(281)``, any callable of the
                image's output row), or ``None``: each image's top-1 class.
            aug_smooth: the mean of the maps of each image and its horizontal flip, times 0.9,
                1.0 and 1.1, as pytorch-grad-cam computes it (not :class:`CAMEngine`'s
                ``aug_smooth``, which normalises the mean again and explains every view for the
                classes of the original image).
            eigen_smooth: the first principal component instead of the channel sum.

        Returns:
            (B, H, W) float32 NumPy maps in [0, 1]. :attr:`outputs` holds the model's output
            (B, N) for ``input_tensor`` (with ``aug_smooth``, pytorch-grad-cam keeps its last
            view's).

        Raises:
            ValueError: not one target per image, or what :class:`CAMEngine` refuses.
        """
        engine = self._engine(bool(eigen_smooth))
        device = next(iter(self.model.parameters()), input_tensor).device
        x = input_tensor.to(device)
        batch = x.shape[0]
        if not aug_smooth:
            res = engine(x, engine_targets(targets, batch))
            self.outputs = res.logits
            return res.heatmaps[:, 0].detach().cpu().float().numpy()
        engine_targets(targets, batch)  # refuse a wrong number of targets before the 6B batch
        # pytorch-grad-cam's aug_smooth, not the engine's: each view is explained for the same
        # targets (None: the view's own top-1) and the views' maps are averaged as they are,
        # not normalised again. The six views are one batch of 6B.
        views = torch.cat([x * f for f in _AUG_FACTORS] + [x.flip(-1) * f for f in _AUG_FACTORS])
        tiled = None if targets is None else list(targets) * (2 * len(_AUG_FACTORS))
        res = engine(views, engine_targets(tiled, views.shape[0]))
        self.outputs = res.logits[len(_AUG_FACTORS) // 2 * batch :][:batch]  # the 1.0 view
        maps = res.heatmaps[:, 0].detach().float().unflatten(0, (2, len(_AUG_FACTORS), batch))
        return torch.cat([maps[0], maps[1].flip(-1)]).mean(0).cpu().numpy()

    def __enter__(self) -> BaseCAM:
        return self

    def __exit__(self, exc_type, exc_value, exc_tb) -> None:
        # nothing to release: the engine leaves no hooks on the model
        return None


class GradCAM(BaseCAM):
    """pytorch-grad-cam's ``GradCAM``: the engine's ``"gradcam"``."""

    method = "gradcam"


class HiResCAM(BaseCAM):
    """pytorch-grad-cam's ``HiResCAM``: the engine's ``"hirescam"``."""

    method = "hirescam"


class GradCAMElementWise(BaseCAM):
    """pytorch-grad-cam's ``GradCAMElementWise``: the engine's ``"gradcam-elementwise"``."""

    method = "gradcam-elementwise"


class GradCAMPlusPlus(BaseCAM):
    """pytorch-grad-cam's ``GradCAMPlusPlus``: the engine's ``"gradcam++"``."""

    method = "gradcam++"


class XGradCAM(BaseCAM):
    """pytorch-grad-cam's ``XGradCAM``: the engine's ``"xgradcam"``."""

    method = "xgradcam"


class LayerCAM(BaseCAM):
    """pytorch-grad-cam's ``LayerCAM``: the engine's ``"layercam"``."""

    method = "layercam"


class EigenCAM(BaseCAM):
    """pytorch-grad-cam's ``EigenCAM``: the engine's ``"eigencam"``."""

    method = "eigencam"


class EigenGradCAM(BaseCAM):
    """pytorch-grad-cam's ``EigenGradCAM``: the engine's ``"eigengradcam"``."""

    method = "eigengradcam"


class SegEigenCAM(BaseCAM):
    """pytorch-grad-cam's ``SegEigenCAM``: the engine's ``"segeigencam"``."""

    method = "segeigencam"


class ScoreCAM(BaseCAM):
    """pytorch-grad-cam's ``ScoreCAM``: the engine's ``"scorecam"``."""

    method = "scorecam"


class AblationCAM(BaseCAM):
    """pytorch-grad-cam's ``AblationCAM``: the engine's ``"ablationcam"``."""

    method = "ablationcam"


class FullGrad(BaseCAM):
    """pytorch-grad-cam's ``FullGrad``: the engine's ``"fullgrad"``.

    FullGrad sums over every bias of the model; ``target_layers`` may be empty (the engine's
    default layer), as pytorch-grad-cam ignores them.
    """

    method = "fullgrad"

    def _engine_layers(self, names: list[str]) -> tuple[str | list[str] | None, dict[str, Any]]:
        return (names[0] if names else None), {}


class KPCA_CAM(BaseCAM):
    """pytorch-grad-cam's ``KPCA_CAM``: the engine's ``"kpca-cam"``."""

    method = "kpca-cam"


class FEM(BaseCAM):
    """pytorch-grad-cam's ``FEM``: the engine's ``"fem"``."""

    method = "fem"


class ShapleyCAM(BaseCAM):
    """pytorch-grad-cam's ``ShapleyCAM``: the engine's ``"shapleycam"``."""

    method = "shapleycam"


class FinerCAM(BaseCAM):
    """pytorch-grad-cam's ``FinerCAM``: the engine's ``"finercam"``.

    As there, ``targets=None`` compares each image's top-1 class with its nearest classes, and
    given targets are explained by the base method alone.
    """

    method = "finercam"

    def __call__(
        self,
        input_tensor: Tensor,
        targets: Sequence[Callable[[Tensor], Tensor]] | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        """See :meth:`BaseCAM.__call__`."""
        if targets is None:
            return super().__call__(input_tensor, None, aug_smooth, eigen_smooth)
        maps = self._base_cam(input_tensor, targets, aug_smooth, eigen_smooth)
        self.outputs = self._base_cam.outputs
        return maps

    @cached_property
    def _base_cam(self) -> BaseCAM:
        base = self._engine(False).method_options.base
        cls = next(c for c in BaseCAM.__subclasses__() if c.method == base)
        options = {k: v for k, v in self._options.items() if k not in ("reshape", "method_options")}
        return cls(self.model, self.target_layers, self._options["reshape"], **options)


class RefineCAM(BaseCAM):
    """pytorch-grad-cam's ``RefineCAM``: the engine's ``"refinecam"``."""

    method = "refinecam"

    def _engine_layers(self, names: list[str]) -> tuple[str | list[str] | None, dict[str, Any]]:
        # RefineCAM multiplies its base method's maps at every layer: one engine method
        if len(names) < 2:
            return super()._engine_layers(names)
        return names[0], {"layers": names[1:]}


class SESS(BaseCAM):
    """pytorch-grad-cam's ``SESS``: the engine's ``"sess"``."""

    method = "sess"


#: pytorch-grad-cam class name -> the engine's method name (the classes above)
METHODS = {cls.__name__: cls.method for cls in BaseCAM.__subclasses__()}


#: OpenCV colour-map codes (``cv2.COLORMAP_*``) of the engine's colour maps
_CV2_COLORMAPS = {2: "jet", 13: "magma", 14: "inferno", 15: "plasma", 16: "viridis", 20: "turbo"}


def show_cam_on_image(
    img: np.ndarray,
    mask: np.ndarray,
    use_rgb: bool = False,
    colormap: int | str = 2,
    image_weight: float = 0.5,
) -> np.ndarray:
    """pytorch-grad-cam's overlay, without OpenCV: ``(1 - w) * colour(mask) + w * img``, scaled
    so that its maximum is 255.

    Args:
        img: (H, W, 3) float image in [0, 1], RGB (``use_rgb=True``) or BGR.
        mask: (H, W) map in [0, 1]; its level is ``uint8(255 * mask)`` (truncated, as there).
        use_rgb: colour the map in RGB; BGR (OpenCV's order) otherwise.
        colormap: an OpenCV code (``cv2.COLORMAP_JET`` = 2, the default; also TURBO, VIRIDIS,
            INFERNO, MAGMA, PLASMA) or a name of :func:`cam_engine.postprocess.available_colormaps`.
            Jet equals OpenCV's within one level.
        image_weight: ``w``, in [0, 1].

    Returns:
        (H, W, 3) uint8.
    """
    if np.max(img) > 1:
        raise ValueError("The input image should np.float32 in the range [0, 1]")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight should be in the range [0, 1]. Got: {image_weight}")
    if isinstance(colormap, int | np.integer) and not isinstance(colormap, bool):
        if int(colormap) not in _CV2_COLORMAPS:
            raise ValueError(
                f"OpenCV colormap {colormap} has no equivalent here; use one of "
                f"{sorted(_CV2_COLORMAPS)} or a name: {sorted(_CV2_COLORMAPS.values())}"
            )
        colormap = _CV2_COLORMAPS[int(colormap)]
    lut = colormap_lut(colormap).numpy()
    heatmap = lut[np.uint8(255 * mask)]
    if not use_rgb:
        heatmap = heatmap[..., ::-1]
    heatmap = np.float32(heatmap) / 255
    cam = (1 - image_weight) * heatmap + image_weight * img
    cam = cam / np.max(cam)
    return np.uint8(255 * cam)
