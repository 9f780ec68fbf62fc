"""Compositions: explanations made of several engine calls, run above the one-layer pipeline.

- several target layers fused (:func:`fuse_layers`);
- ``aug_smooth``: the maps of flipped and rescaled copies averaged (:func:`aug_smooth`);
- the meta-methods RefineCAM (a base method at several layers) and SESS (a base method on
  several crops), as pytorch-grad-cam 1.5.7 defines them (RefineCAM also as torchcam 0.5 does).

A meta-method's base (``base``, any registered method but the compositions, with its own
``base_options`` and ``eigen_smooth``) runs through :class:`~cam_engine.explainer.LayerExplainer`
on the split model, batched over images and targets; the targets are the outer call's (class ids
or score functions). Its gradients are taken through the head, never in closed form. Meta-methods
are listed by :func:`cam_engine.methods.available` like every method; :class:`cam_engine.CAMEngine`
runs them from :data:`COMPOSITIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur, resize

from . import methods, postprocess
from .explainer import CAMResult, LayerMaps
from .methods import MethodOptions, check_count, check_number
from .methods._registry import register_composition
from .targets import Resolved

__all__ = [
    "COMPOSITIONS",
    "Composition",
    "RefineOptions",
    "SessOptions",
    "refinecam",
    "sess",
    "aug_smooth",
    "fuse_layers",
    "FUSIONS",
    "AUG_FACTORS",
]

FUSIONS = ("mean", "max")
AUG_FACTORS = (0.9, 1.0, 1.1)  # pytorch-grad-cam's aug_smooth: ttach Multiply x HorizontalFlip
REFINE_FUSES = ("pytorch-grad-cam", "torchcam")
SESS_POOLS = ("mean", "max")

#: base(layer or None for the engine's own) -> call(x, targets) -> CAMResult
BaseFactory = Callable[[str | None], Callable[[Tensor, Resolved], CAMResult]]


def fuse_layers(layers: list[LayerMaps], size: tuple[int, ...], fusion: str) -> CAMResult:
    """Several layers' maps of one batch fused at the input ``size``.

    pytorch-grad-cam normalises each layer's map at its own resolution, then resizes; with an
    interior maximum that is not the same as resizing first, so it is followed. The fused map
    (``"mean"`` or ``"max"``) is normalised again; the first layer gives logits and classes.
    """
    first = layers[0]
    with torch.no_grad():
        maps = torch.stack(
            [postprocess.upsample(postprocess.normalize(layer.cams), size) for layer in layers]
        )
        fused = maps.mean(0) if fusion == "mean" else maps.amax(0)
        return CAMResult(postprocess.normalize(fused), fused, first.logits, first.classes)


def aug_smooth(
    explain: Callable[[Tensor, Resolved], CAMResult],
    predict: Callable[[Tensor], Tensor],
    resolve: Callable[[Tensor], Resolved],
    x: Tensor,
) -> CAMResult:
    """pytorch-grad-cam's ``aug_smooth``: the heatmaps of x and its horizontal flip, each times
    0.9, 1.0 and 1.1, averaged (one batch of 6B images; targets bound to the original images).

    Args:
        explain: the engine's call on a batch with bound targets.
        predict: the model's output for a batch (no autograd).
        resolve: binds the caller's targets to the original images' output.
        x: (B, C, H, W).
    """
    batch = x.shape[0]
    logits = predict(x)
    resolved = resolve(logits)
    views = torch.cat([x * f for f in AUG_FACTORS] + [x.flip(-1) * f for f in AUG_FACTORS])
    rows = torch.arange(views.shape[0], device=x.device) % batch
    res = explain(views, resolved.take(rows))
    with torch.no_grad():

        def unaugment(maps: Tensor) -> Tensor:
            maps = maps.unflatten(0, (2, len(AUG_FACTORS), batch))
            return torch.cat([maps[0], maps[1].flip(-1)]).mean(0)

        heatmaps = postprocess.normalize(unaugment(res.heatmaps))
        cams = unaugment(postprocess.normalize(res.cams))
    return CAMResult(heatmaps, cams, logits, resolved.classes)


@dataclass(frozen=True)
class BaseOptions(MethodOptions):
    """A meta-method's base: ``base`` (a registered method, not a composition; ``None``: the
    meta-method's default), its own ``base_options`` and ``eigen_smooth``."""

    base: str | None = None
    base_options: Mapping[str, Any] | None = None
    eigen_smooth: bool = False

    def __post_init__(self) -> None:
        if self.base is None:  # the meta-method's own default
            object.__setattr__(self, "base", type(self).__dataclass_fields__["base"].default)
        base = methods.get(self.base)
        if base.composition:
            raise ValueError(f"the base of a meta-method cannot be {base.name!r}")
        parsed = base.options.parse(base.name, self.base_options)
        object.__setattr__(self, "base_options", parsed)
        if not isinstance(self.eigen_smooth, bool):
            raise ValueError(f"eigen_smooth must be a bool, got {self.eigen_smooth!r}")
        if self.eigen_smooth and not base.smoothable:
            raise ValueError(f"method {base.name!r} has no eigen_smooth form")


@dataclass(frozen=True)
class RefineOptions(BaseOptions):
    """RefineCAM: ``layers`` besides the target (at least one), ``fuse`` in
    :data:`REFINE_FUSES`; base ``"gradcam++"`` by default."""

    base: str = "gradcam++"
    layers: tuple[str, ...] = ()
    fuse: str = "pytorch-grad-cam"

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = self.layers
        if isinstance(layers, str) or not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(
                "refinecam needs more layers than the target: method_options={'layers': [...]}"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"refinecam's layers must differ from each other: {list(layers)}")
        object.__setattr__(self, "layers", tuple(layers))
        if self.fuse not in REFINE_FUSES:
            raise ValueError(f"unknown fuse {self.fuse!r}; use one of {', '.join(REFINE_FUSES)}")


@dataclass(frozen=True)
class SessOptions(BaseOptions):
    """SESS's knobs, pytorch-grad-cam's defaults (``window_size`` ``None``: the shorter side,
    ``step_size`` ``None``: the window, ``scales`` ``None``: ``num_scales`` from the window up by
    ``round(scale_step_ratio * window)``); base ``"gradcam"`` by default."""

    base: str = "gradcam"
    scales: tuple[int, ...] | None = None
    num_scales: int = 12
    scale_step_ratio: float = 2.0 / 7.0
    window_size: int | None = None
    step_size: int | None = None
    pre_filter_ratio: float = 0.0
    theta: float = 0.0
    pool: str = "mean"
    smooth: bool = True
    use_softmax_scores: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in SESS_POOLS:
            raise ValueError(f"pool has to be one of {', '.join(SESS_POOLS)}, got {self.pool!r}")
        check_number("pre_filter_ratio", self.pre_filter_ratio)
        if not 0.0 <= self.pre_filter_ratio < 1.0:
            raise ValueError(f"pre_filter_ratio has to be in [0, 1), got {self.pre_filter_ratio}")
        check_number("scale_step_ratio", self.scale_step_ratio)
        check_number("theta", self.theta)
        for name in ("num_scales", "window_size", "step_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError("num_scales, window_size and step_size have to be at least 1")
        if self.scales is not None:
            for scale in self.scales:
                check_count("every scale", scale)
            object.__setattr__(self, "scales", tuple(self.scales))


def _sess_settings(options: SessOptions, x: Tensor) -> dict[str, Any]:
    """The options with the defaults that depend on the input's size filled in."""
    opts = {f: getattr(options, f) for f in SessOptions.__dataclass_fields__}
    window = opts["window_size"] or min(x.shape[2:])
    opts["window_size"] = window
    opts["step_size"] = opts["step_size"] or window
    if opts["scales"] is None:
        step = int(round(window * opts["scale_step_ratio"]))
        opts["scales"] = [window + step * i for i in range(opts["num_scales"])]
    if min(opts["scales"]) < window:
        raise ValueError(f"every scale has to be at least the window size {window}")
    return opts


@dataclass(frozen=True)
class Composition:
    """What a meta-method gets: the batch, its bound targets and the means to run its base.

    Attributes:
        x: (B, C, H, W) images.
        targets: the outer call's targets bound to ``x``.
        options: the meta-method's options.
        batch_size: windows (SESS) per base call.
        target_layer: the engine's target layer.
        base: ``base(layer)``: the base method at ``layer`` (``None``: the engine's own) as a
            call ``(x, targets) -> CAMResult``.
        predict: the model's output for other inputs, without autograd.
    """

    x: Tensor
    targets: Resolved
    options: Any
    batch_size: int
    target_layer: str
    base: BaseFactory
    predict: Callable[[Tensor], Tensor] = field(repr=False)

    @property
    def classes(self) -> Tensor:
        """(B, K) the explained classes."""
        return self.targets.classes

    @property
    def scores(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The explained scores of an output whose row ``i`` comes from image ``rows[i]``."""
        return self.targets.scores

    def bound(self, rows: Tensor) -> Resolved:
        """The outer targets for a batch whose row ``i`` comes from image ``rows[i]``; scored
        through the head (``one_hot=False``: never in closed form, as the peers do)."""
        return Resolved(self.classes, self.scores, one_hot=False).take(rows)


def refinecam(ctx: Composition) -> Tensor:
    """RefineCAM (arXiv 2605.14641): the product of a base method's maps at several layers,
    which keeps what the deep layer finds with the shallow layers' resolution.

    The maps are computed at the target layer and at ``layers`` with ``base`` (default
    ``"gradcam++"``, as both peers); options: :class:`RefineOptions`. ``fuse``:

    - ``"pytorch-grad-cam"`` (default): each layer's heatmap (ReLU, normalised, upsampled to the
      input size, normalised again: pytorch-grad-cam's ``scale_cam_image`` twice, its "[0, 1]"
      loop being a no-op) multiplied at the input size;
    - ``"torchcam"``: each layer's map normalised at its own size, upsampled to the largest
      layer size and multiplied there. torchcam's own ``GradCAMpp`` differs from ours (and
      pytorch-grad-cam's): it divides a masked copy of ``alpha``, so its ``alpha`` is ``g^2``.

    One split forward (trunk without autograd, head with) per layer, batched over images and
    targets; pytorch-grad-cam runs a full forward and backward per layer and torchcam one of
    each for all layers, one class per image.

    Returns:
        (B, K, H, W) at the input size (``"torchcam"``: (B, K, h, w) at the largest layer's size).
    """
    layers = [None, *ctx.options.layers]
    if ctx.target_layer in ctx.options.layers:
        raise ValueError(
            f"refinecam's layers must differ from the target {ctx.target_layer!r}: "
            f"{list(ctx.options.layers)}"
        )
    rows = torch.arange(ctx.x.shape[0], device=ctx.x.device)
    results = [ctx.base(layer)(ctx.x, ctx.bound(rows)) for layer in layers]
    with torch.no_grad():
        if ctx.options.fuse == "pytorch-grad-cam":
            return torch.stack([r.heatmaps for r in results]).prod(0)
        size = torch.tensor([r.cams.shape[2:] for r in results]).amax(0).tolist()
        maps = [postprocess.upsample(postprocess.normalize(r.cams), size) for r in results]
        return torch.stack(maps).prod(0)


def _starts(length: int, step: int, window: int) -> list[int]:
    """pytorch-grad-cam's ``window_starts``: windows crossing the far border are shifted back."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            return [*starts, max(length - window, 0)]
        starts.append(start)
    return starts


def _scaled(x: Tensor, opts: dict[str, Any]) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Per scale: the index of its first window, the resized images (shorter side = scale,
    torchvision's ``resize`` as pytorch-grad-cam) and the windows' corners (P_s, 2) as (y, x)."""
    first, window, step = 0, opts["window_size"], opts["step_size"]
    for scale in opts["scales"]:
        images = resize(x, scale)
        rows, cols = (_starts(length, step, window) for length in images.shape[2:])
        corners = [(y, c) for y in rows for c in cols]
        yield first, images, torch.tensor(corners, device=x.device)
        first += len(corners)


def _window_index(corners: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Row and column indices (n, w, 1), (n, 1, w) of the windows at ``corners`` (n, 2)."""
    offsets = torch.arange(window, device=corners.device)
    return (corners[:, :1] + offsets)[:, :, None], (corners[:, 1:] + offsets)[:, None, :]


def _crop(images: Tensor, rows: Tensor, corners: Tensor, window: int) -> Tensor:
    """(n, C, w, w) windows of ``images[rows]`` at ``corners``, one gather for the chunk."""
    ys, xs = _window_index(corners, window)
    return images[rows[:, None, None], :, ys, xs].permute(0, 3, 1, 2)


def _paste(maps: Tensor, corners: Tensor, size: tuple[int, int]) -> Tensor:
    """(n, K, w, w) maps placed at ``corners`` on zero canvases (n, K, *size)."""
    canvas = maps.new_zeros(*maps.shape[:2], *size)
    ys, xs = _window_index(corners, maps.shape[-1])
    canvas[torch.arange(len(maps), device=maps.device)[:, None, None], :, ys, xs] = maps.permute(
        0, 2, 3, 1
    )
    return canvas


def _chunked(images: Tensor, kept: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(window, image) index pairs of one scale where ``kept`` (P_s, B), ``batch_size`` at once."""
    flat = kept.flatten().nonzero()[:, 0]
    for idx in flat.split(batch_size) if len(flat) else ():
        yield idx // images.shape[0], idx % images.shape[0]


def _patch_scores(ctx: Composition, opts: dict[str, Any]) -> Tensor:
    """The clipped target scores (P, B, K) of every window of every scale."""
    scores = []
    with torch.no_grad():
        for _, images, corners in _scaled(ctx.x, opts):
            kept = torch.ones(len(corners), images.shape[0], dtype=torch.bool, device=ctx.x.device)
            for window, rows in _chunked(images, kept, ctx.batch_size):
                patches = _crop(images, rows, corners[window], opts["window_size"])
                out = ctx.predict(patches)
                out = out.softmax(-1) if opts["use_softmax_scores"] else out
                scores.append(ctx.scores(out, rows).clamp_min(0))
    return torch.cat(scores).unflatten(0, (-1, ctx.x.shape[0]))


def _patch_weights(scores: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Channel-wise weights ``score / max score`` (ones where all are 0) and the windows kept
    after dropping the ``ratio`` lowest-scoring ones, per image and target: (P, B, K) each."""
    top = scores.amax(0, keepdim=True)
    weights = torch.where(top > 0, scores / torch.where(top > 0, top, 1), 1)
    order = scores.argsort(dim=0, stable=True)
    kept = torch.ones_like(scores, dtype=torch.bool)
    kept.scatter_(0, order[: int(len(scores) * ratio)], False)
    return weights, kept


def _without_noise(res: CAMResult) -> Tensor:
    """The base heatmaps (n, K, w, w) with the bilinear resize's rounding noise set to 0.

    SESS counts a window at a pixel when its map is above ``theta`` (0): a map's flat minimum
    region must be exactly 0, as OpenCV's resize keeps it. Torch's bilinear resize is off there
    by about an ulp of the map's magnitude, relative to its range after normalisation.
    """
    lo, hi = res.cams.flatten(2).aminmax(dim=-1)
    noise = 4 * torch.finfo(res.heatmaps.dtype).eps * hi.abs() / (hi - lo)
    return torch.where(res.heatmaps > noise[..., None, None], res.heatmaps, 0)


def _accumulate(
    total: Tensor, counts: Tensor, maps: Tensor, used: Tensor, rows: Tensor, opts: dict[str, Any]
) -> None:
    """Fuse a chunk's maps (n, K, H, W) of images ``rows`` into ``total`` / ``counts`` (B, K, H, W)
    in place; ``used`` (n, K, 1, 1): the window survived the pre-filter."""
    if opts["pool"] == "max":
        index = rows.view(-1, 1, 1, 1).expand_as(maps)
        total.scatter_reduce_(0, index, torch.where(used, maps, 0), "amax")
        return
    used = used & (maps > opts["theta"])
    total.index_add_(0, rows, torch.where(used, maps, 0))
    counts.index_add_(0, rows, used.to(total.dtype))


def sess(ctx: Composition) -> Tensor:
    """SESS, Saliency Enhancing with Scaling and Sliding (Tan et al., 2022), as pytorch-grad-cam.

    The images are resized to several scales (shorter side ``scales``, default ``num_scales``
    = 12 from ``window_size`` up by ``round(scale_step_ratio * window_size)``, ratio 2/7); square
    windows (``window_size``, default the shorter side; stride ``step_size``, default the window)
    are cut from each; each window is scored (its target score after a softmax when
    ``use_softmax_scores``, clipped at 0), the lowest ``pre_filter_ratio`` of them dropped, and the
    base method's heatmap (``base``, default ``"gradcam"``) of each, times its score over the best
    one, is pasted back and resized to the input size. The maps are fused per pixel: ``pool``
    ``"mean"`` over the windows whose value exceeds ``theta`` (default 0) or ``"max"``, then
    Gaussian-blurred (11 px, sigma 5) when ``smooth``.

    Batched: the windows of all images and scales are scored, and their base maps computed, in
    chunks of ``batch_size`` (every image has the same windows), for all K targets at once;
    pytorch-grad-cam does one image and one target at a time and pastes each window in NumPy.
    The loop over scales stays (each has its own canvas size), as does the scoring pass before
    the mapping pass (weights and pre-filter need every window's score). Tied scores are dropped
    by the pre-filter in window order (NumPy's unstable sort may drop another one).

    Returns:
        (B, K, H, W) at the input size, non-negative.
    """
    opts = _sess_settings(ctx.options, ctx.x)
    weights, kept = _patch_weights(_patch_scores(ctx, opts), opts["pre_filter_ratio"])
    base, size = ctx.base(None), tuple(ctx.x.shape[2:])
    total = ctx.x.new_zeros(*ctx.classes.shape, *size)
    counts = torch.zeros_like(total)
    for first, images, corners in _scaled(ctx.x, opts):
        windows = slice(first, first + len(corners))
        for window, rows in _chunked(images, kept[windows].any(-1), ctx.batch_size):
            patches = _crop(images, rows, corners[window], opts["window_size"])
            heat = _without_noise(base(patches, ctx.bound(rows)))
            with torch.no_grad():
                heat = heat * weights[windows][window, rows][..., None, None]
                maps = postprocess.upsample(_paste(heat, corners[window], images.shape[2:]), size)
                used = kept[windows][window, rows][..., None, None]
                _accumulate(total, counts, maps, used, rows, opts)
    fused = total if opts["pool"] == "max" else total / torch.where(counts > 0, counts, 1)
    return gaussian_blur(fused, [11, 11], [5.0, 5.0]) if opts["smooth"] else fused


#: meta-method name -> what computes it
COMPOSITIONS: dict[str, Callable[[Composition], Tensor]] = {"refinecam": refinecam, "sess": sess}
register_composition("refinecam", RefineOptions)
register_composition("sess", SessOptions, two_d_only=True)
