"""Meta-methods over a base method: RefineCAM (several layers) and SESS (several crops), as
pytorch-grad-cam 1.5.7 defines them (RefineCAM also as torchcam 0.5 does).

The base method (``method_options["base"]``, any registered method but these two, with its own
options in ``"base_options"`` and ``"eigen_smooth"``) runs through a :class:`cam_engine.CAMEngine`
on the split model, batched over images and targets; the targets are the outer call's (class ids
or score functions). Its gradients are taken through the head, never in closed form.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur, resize

from .. import postprocess
from ..model import CAMModel
from ..targets import Resolved
from ._registry import Context, get, register

REFINE_FUSES = ("pytorch-grad-cam", "torchcam")
SESS_POOLS = ("mean", "max")
_META = ("refinecam", "sess")
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base(ctx: Context, cam_model: CAMModel, default: str) -> Any:
    """A :class:`cam_engine.CAMEngine` of the base method on ``cam_model``."""
    from ..engine import CAMEngine  # the engine imports the methods: import on use

    name = get(ctx.options.get("base") or default).name
    if name in _META:
        raise ValueError(f"the base of a meta-method cannot be {name!r}")
    return CAMEngine(
        cam_model,
        method=name,
        reshape=ctx.reshape,
        check_finite=False,
        eigen_smooth=ctx.options.get("eigen_smooth", False),
        batch_size=ctx.batch_size,
        method_options=ctx.options.get("base_options"),
    )


def _targets(ctx: Context, rows: Tensor) -> Resolved:
    """The outer call's targets for a batch whose row ``i`` comes from image ``rows[i]``."""
    return Resolved(ctx.classes, ctx.scores, one_hot=False).take(rows)


def _layer_model(ctx: Context, layer: str) -> CAMModel:
    """The model split at ``layer``, built once per engine split."""
    models = _MODELS.setdefault(ctx.cam_model, {})
    if layer not in models:
        outer = ctx.cam_model
        models[layer] = CAMModel(
            ctx.model,
            layer,
            output=outer.output,
            input_size=outer.input_size,
            compile=False if outer.compile_options is None else outer.compile_options,
            channels_last=outer.channels_last,
        )
    return models[layer]


def _refine_layers(ctx: Context) -> list[CAMModel]:
    _check_options(ctx, {"layers", "fuse"})
    layers = ctx.options.get("layers")
    if isinstance(layers, str) or not layers:
        raise ValueError(
            "refinecam needs more layers than the target: method_options={'layers': [...]}"
        )
    names = [ctx.cam_model.target_layer, *layers]
    if len(set(names)) != len(names):
        raise ValueError(f"refinecam's layers must differ from each other and the target: {names}")
    return [ctx.cam_model, *(_layer_model(ctx, layer) for layer in layers)]


@register("refinecam", uses_gradients=False, needs_context=True)
def refinecam(ctx: Context) -> Tensor:
    """RefineCAM (arXiv 2605.14641): the product of a base method's maps at several layers,
    which keeps what the deep layer finds with the shallow layers' resolution.

    The maps are computed at the target layer and at ``method_options["layers"]`` with ``base``
    (default ``"gradcam++"``, as both peers). ``fuse``:

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
    fuse = ctx.options.get("fuse", "pytorch-grad-cam")
    if fuse not in REFINE_FUSES:
        raise ValueError(f"unknown fuse {fuse!r}; use one of {', '.join(REFINE_FUSES)}")
    rows = torch.arange(ctx.x.shape[0], device=ctx.x.device)
    results = [_base(ctx, m, "gradcam++")(ctx.x, _targets(ctx, rows)) for m in _refine_layers(ctx)]
    with torch.no_grad():
        if fuse == "pytorch-grad-cam":
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


def _check_options(ctx: Context, known: set[str]) -> None:
    unknown = set(ctx.options) - known - {"base", "base_options", "eigen_smooth"}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")


def _sess_options(ctx: Context) -> dict[str, Any]:
    """SESS's knobs with pytorch-grad-cam's defaults; ``ValueError`` for bad ones."""
    opts = {
        "scales": None,
        "num_scales": 12,
        "scale_step_ratio": 2.0 / 7.0,
        "window_size": min(ctx.x.shape[2:]),
        "step_size": None,
        "pre_filter_ratio": 0.0,
        "theta": 0.0,
        "pool": "mean",
        "smooth": True,
        "use_softmax_scores": True,
    }
    _check_options(ctx, set(opts))
    opts.update({k: v for k, v in ctx.options.items() if k in opts and v is not None})
    window = opts["window_size"]
    opts["step_size"] = window if opts["step_size"] is None else opts["step_size"]
    if opts["pool"] not in SESS_POOLS:
        raise ValueError(f"pool has to be one of {', '.join(SESS_POOLS)}, got {opts['pool']!r}")
    if not 0.0 <= opts["pre_filter_ratio"] < 1.0:
        raise ValueError(f"pre_filter_ratio has to be in [0, 1), got {opts['pre_filter_ratio']}")
    if min(opts["num_scales"], window, opts["step_size"]) < 1:
        raise ValueError("num_scales, window_size and step_size have to be at least 1")
    if opts["scales"] is None:
        step = int(round(window * opts["scale_step_ratio"]))
        opts["scales"] = [window + step * i for i in range(opts["num_scales"])]
    if min(opts["scales"]) < window:
        raise ValueError(f"every scale has to be at least the window size {window}")
    return opts


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


def _patch_scores(ctx: Context, opts: dict[str, Any]) -> Tensor:
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


def _without_noise(res: Any) -> Tensor:
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


@register("sess", uses_gradients=False, needs_context=True, two_d_only=True)
def sess(ctx: Context) -> Tensor:
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
    opts = _sess_options(ctx)
    weights, kept = _patch_weights(_patch_scores(ctx, opts), opts["pre_filter_ratio"])
    base, size = _base(ctx, ctx.cam_model, "gradcam"), tuple(ctx.x.shape[2:])
    total = ctx.x.new_zeros(*ctx.classes.shape, *size)
    counts = torch.zeros_like(total)
    for first, images, corners in _scaled(ctx.x, opts):
        windows = slice(first, first + len(corners))
        for window, rows in _chunked(images, kept[windows].any(-1), ctx.batch_size):
            patches = _crop(images, rows, corners[window], opts["window_size"])
            heat = _without_noise(base(patches, _targets(ctx, rows)))
            with torch.no_grad():
                heat = heat * weights[windows][window, rows][..., None, None]
                maps = postprocess.upsample(_paste(heat, corners[window], images.shape[2:]), size)
                used = kept[windows][window, rows][..., None, None]
                _accumulate(total, counts, maps, used, rows, opts)
    fused = total if opts["pool"] == "max" else total / torch.where(counts > 0, counts, 1)
    return gaussian_blur(fused, [11, 11], [5.0, 5.0]) if opts["smooth"] else fused
