"""From raw class-activation maps to heatmaps, colour images and overlays.

Every function is pure torch and batched: it runs on the tensors' device, has no Python loop over
images and never synchronises with the host. The library's rule for heatmaps is to upsample the
ReLU'd low-resolution map to the input size (bilinear, half-pixel centres, i.e.
``align_corners=False``) and then min-max normalise each full-resolution map to [0, 1], a map that
is flat up to float rounding becoming all zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, lru_cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "upsample",
    "normalize",
    "heatmaps",
    "shrink",
    "available_colormaps",
    "colormap_lut",
    "colorize",
    "overlay",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def upsample(cams: Tensor, size: int | Sequence[int]) -> Tensor:
    """Resize maps to ``size`` with linear interpolation and half-pixel centres.

    Args:
        cams: (B, K, h, w) maps (bilinear) or (B, K, d, h, w) volumes (trilinear), floating point.
        size: target spatial size, (H, W) or (D, H, W); an int is used for every spatial dim.

    Returns:
        (B, K, H, W) or (B, K, D, H, W), same dtype and device as ``cams``; ``cams`` itself when
        it already has that size.
    """
    if cams.ndim not in (4, 5):
        raise ValueError(
            f"cams must be (B, K, h, w) or (B, K, d, h, w), got shape {tuple(cams.shape)}"
        )
    if not cams.is_floating_point():
        raise ValueError(f"cams must be floating point, got {cams.dtype}")
    n_spatial = cams.ndim - 2
    size = (int(size),) * n_spatial if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != n_spatial:
        raise ValueError(f"size {size} has {len(size)} dims, cams have {n_spatial} spatial dims")
    if tuple(cams.shape[2:]) == size:
        return cams
    mode = "bilinear" if n_spatial == 2 else "trilinear"
    return F.interpolate(cams, size=size, mode=mode, align_corners=False)


# A map whose range is within this many ulps of its magnitude is flat: a constant map comes out of
# bilinear (trilinear) resizing within a few rounding errors of its value either way (each output
# is 4 (8) rounded products and sums; 3.3 ulps measured on 1x1 .. 14x14 maps to 513x513), and
# averaging such maps (aug_smooth, layer fusion) adds one or two more. Real contrast that small is
# below what the dtype resolves.
_FLAT_ULPS = 16


def normalize(maps: Tensor, *, eps: float | None = None) -> Tensor:
    """Min-max normalise each map to [0, 1].

    ``(m - min) / (max - min)`` with no epsilon, so maps of any magnitude (1e-13 included) reach
    exactly 0 and 1. A map is flat, and becomes all zeros, when its range is within float rounding
    of its magnitude: ``max - min <= 16 * finfo(maps.dtype).eps * max(|min|, |max|)`` (a constant
    map resized bilinearly keeps ripples of a few ulps, which min-max would stretch to [0, 1]).
    The test is relative, so a low-magnitude map with real contrast still spans [0, 1].
    NaN and inf are not checked for. float16 / bfloat16 maps are computed in float32 and cast back.

    Args:
        maps: (B, K, *spatial) with at least one spatial dim, each (B, K) entry one map; a tensor
            of rank 1 or 2 is one map, e.g. a lone (H, W) heatmap. Floating point.
        eps: ``None`` for the rule above. A float gives ``(m - min) / (max - min + eps)`` instead,
            with no flat rule: the formula of pytorch-grad-cam (``1e-7``) and torchcam (``1e-8``),
            only for parity with them (it crushes low-magnitude maps towards 0).

    Returns:
        The shape, dtype and device of ``maps``.
    """
    if maps.ndim == 0:
        raise ValueError("maps must have at least one dim: (H, W), (B, K, H, W), ...")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be floating point, got {maps.dtype}")
    return _normalized(maps, eps, overwrite=False)


def _normalized(maps: Tensor, eps: float | None, overwrite: bool) -> Tensor:
    """:func:`normalize` of checked ``maps``; with ``overwrite``, in ``maps``' own memory (a
    tensor the caller made for it): no two new tensors of its size to allocate and fault in
    (2.4x faster on 8 maps of 480 x 640 here when that memory is fresh; little where freed
    memory is reused). Never in place where autograd records it."""
    work = maps.float() if maps.dtype in _HALF_DTYPES else maps
    flat = work.flatten(2) if maps.ndim >= 3 else work.reshape(1, 1, -1)
    lo, hi = torch.aminmax(flat, dim=-1, keepdim=True)
    span = hi - lo
    if eps is None:
        noise = _FLAT_ULPS * torch.finfo(maps.dtype).eps * torch.maximum(lo.abs(), hi.abs())
        # Dividing by inf turns a flat map's ripples into exact zeros.
        span = torch.where(span > noise, span, torch.inf)
    else:
        span = span + eps
    ours = overwrite or work is not maps  # a float32 copy of half maps is ours too
    if ours and not (torch.is_grad_enabled() and flat.requires_grad):
        return flat.sub_(lo).div_(span).view(maps.shape).to(maps.dtype)
    return ((flat - lo) / span).view(maps.shape).to(maps.dtype)


def heatmaps(cams: Tensor, size: int | Sequence[int]) -> Tensor:
    """Heatmaps by the library's rule: :func:`upsample`, then :func:`normalize`.

    Args:
        cams: (B, K, h, w) (or (B, K, d, h, w)) ReLU'd class-activation maps.
        size: output spatial size (H, W) (or (D, H, W)).

    Returns:
        (B, K, H, W) in [0, 1] (flat maps all zeros, see :func:`normalize`); float64 for float64
        ``cams``, float32 otherwise.
    """
    dtype = torch.float64 if cams.dtype == torch.float64 else torch.float32
    maps = upsample(cams.to(dtype), size)
    return _normalized(maps, None, overwrite=maps is not cams)


def shrink(images: Tensor, longest: int) -> Tensor:
    """Scale images down so that their longest side is at most ``longest``, aspect ratio kept:
    antialiased bilinear (a triangle filter as wide as the scale: PIL's BILINEAR), so that every
    input pixel counts. uint8 images on the CPU take torch's fixed-point kernel (within one level
    of the filter in float; on one thread, 0.75 ms a 640 x 480 RGB photo in a batch of 16, 1.5
    ms alone, against 3.6 ms for PIL's box filter with its copies);
    on other devices, which have no uint8 kernel, they are filtered in float32 and rounded.

    Args:
        images: (N, C, H, W) uint8 or floating point; channels-last ones stay channels-last.
        longest: the longest side allowed, >= 1.

    Returns:
        (N, C, h, w), the dtype and device of ``images``, each side
        ``max(1, round(side * longest / max(H, W)))``; ``images`` itself when
        ``max(H, W) <= longest``.

    Example:
        >>> shrink(torch.zeros(2, 3, 480, 640, dtype=torch.uint8), 512).shape
        torch.Size([2, 3, 384, 512])
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    if longest < 1:
        raise ValueError(f"longest must be >= 1, got {longest}")
    height, width = images.shape[-2:]
    scale = longest / max(height, width)
    if scale >= 1:
        return images
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if images.dtype == torch.uint8 and images.device.type != "cpu":
        return _shrink_in_float(images, size)
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def _shrink_in_float(images: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (N, C, H, W) images resized to ``size`` by :func:`shrink`'s filter in float32,
    rounded to the nearest level (torch's antialiased uint8 kernel runs on the CPU only)."""
    small = F.interpolate(
        images.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return small.round_().clamp_(0, 255).to(torch.uint8)


# Colour maps ------------------------------------------------------------------------------------

# Breakpoints (index, r, g, b) of matplotlib's 256-entry colour tables: exact uint8 entries, chosen
# so that linear interpolation between them reproduces every entry within one level.
# viridis, inferno, magma, plasma: Stefan van der Walt and Nathaniel Smith, CC0.
# turbo: Anton Mikhailov, Google LLC, Apache-2.0.
# fmt: off
_KNOTS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "turbo": (
        (0, 48, 18, 59), (8, 57, 42, 115), (16, 64, 64, 162), (24, 68, 86, 199),
        (31, 70, 105, 224), (38, 71, 123, 242), (44, 69, 138, 252), (50, 64, 153, 255),
        (58, 51, 173, 247), (66, 37, 192, 231), (74, 26, 210, 210), (82, 24, 224, 189),
        (89, 32, 234, 172), (98, 56, 244, 145), (113, 113, 254, 95), (123, 150, 254, 68),
        (132, 175, 250, 55), (141, 198, 240, 52), (155, 229, 217, 56), (166, 246, 195, 58),
        (176, 253, 172, 52), (188, 253, 138, 38), (202, 242, 96, 20), (213, 228, 69, 10),
        (228, 200, 40, 3), (243, 161, 18, 1), (255, 122, 4, 3),
    ),
    "viridis": (
        (0, 68, 1, 84), (20, 72, 29, 111), (35, 70, 48, 126), (58, 62, 76, 138),
        (94, 45, 113, 142), (132, 31, 148, 140), (147, 31, 162, 135), (162, 42, 176, 127),
        (179, 68, 191, 112), (198, 108, 205, 90), (223, 170, 220, 50), (237, 208, 225, 28),
        (244, 226, 228, 24), (253, 248, 230, 33), (255, 253, 231, 37),
    ),
    "inferno": (
        (0, 0, 0, 4), (7, 3, 2, 16), (22, 18, 10, 50), (35, 38, 12, 81), (45, 56, 9, 98),
        (58, 77, 13, 108), (81, 114, 26, 110), (105, 152, 39, 102), (128, 188, 55, 84),
        (151, 218, 78, 60), (172, 239, 108, 35), (193, 250, 144, 8), (199, 251, 155, 6),
        (206, 252, 168, 13), (217, 251, 190, 35), (229, 246, 213, 67), (238, 242, 230, 97),
        (246, 242, 244, 130), (254, 250, 253, 161), (255, 252, 255, 164),
    ),
    "magma": (
        (0, 0, 0, 4), (7, 3, 3, 15), (20, 14, 11, 43), (37, 36, 18, 83), (48, 54, 16, 107),
        (58, 71, 16, 120), (75, 98, 25, 128), (104, 144, 42, 129), (131, 188, 57, 120),
        (151, 219, 71, 106), (168, 239, 93, 94), (182, 248, 118, 92), (196, 252, 144, 101),
        (216, 254, 182, 124), (244, 253, 233, 170), (255, 252, 253, 191),
    ),
    "plasma": (
        (0, 13, 8, 135), (8, 34, 6, 144), (31, 75, 3, 161), (52, 108, 0, 168), (68, 132, 5, 167),
        (88, 160, 26, 156), (122, 198, 65, 125), (161, 231, 110, 91), (193, 249, 151, 63),
        (221, 254, 192, 41), (237, 250, 218, 36), (251, 242, 242, 39), (254, 240, 247, 36),
        (255, 240, 249, 33),
    ),
}
# fmt: on


def _from_knots(knots: tuple[tuple[int, int, int, int], ...]) -> Tensor:
    table = torch.tensor(knots, dtype=torch.float64)
    x, rgb = table[:, 0].contiguous(), table[:, 1:]
    j = torch.arange(256, dtype=torch.float64)
    seg = (torch.searchsorted(x, j, right=True) - 1).clamp(0, len(knots) - 2)
    x0, x1 = x[seg], x[seg + 1]
    t = ((j - x0) / (x1 - x0)).unsqueeze(1)
    return (rgb[seg] + (rgb[seg + 1] - rgb[seg]) * t).round()


def _jet() -> Tensor:
    # Jet: channel = clip(1.5 - 4 |x - c|, 0, 1), c = 3/4, 1/2, 1/4 for R, G, B, sampled at
    # x = j / 255. Times 255 this is 382.5 - |4 j - 1020 c|: exact in binary, so the halves round
    # to even as in OpenCV's COLORMAP_JET (whose float32 table is one level lower in one entry).
    four_j = 4 * torch.arange(256, dtype=torch.float64).unsqueeze(1)
    centres = torch.tensor([765.0, 510.0, 255.0], dtype=torch.float64)
    return (382.5 - (four_j - centres).abs()).clamp(0, 255).round()


def _gray() -> Tensor:
    return torch.arange(256, dtype=torch.float64).unsqueeze(1).expand(256, 3)


_BUILDERS = {
    "jet": _jet,
    "gray": _gray,
    **{name: partial(_from_knots, knots) for name, knots in _KNOTS.items()},
}


def available_colormaps() -> list[str]:
    """Names accepted by :func:`colormap_lut`, :func:`colorize` and :func:`overlay`."""
    return sorted(_BUILDERS)


@cache
def _cached_lut(name: str, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return _BUILDERS[name]().to(torch.uint8).contiguous().to(device)


def colormap_lut(name: str, device: torch.device | str | None = None) -> Tensor:
    """The 256-entry RGB lookup table of a colour map.

    ``"jet"`` equals OpenCV's ``COLORMAP_JET`` (as RGB; what pytorch-grad-cam shows) within one
    level; ``"turbo"``, ``"viridis"``, ``"inferno"``, ``"magma"`` and ``"plasma"`` equal
    matplotlib's within one level; ``"gray"`` is the identity.

    Args:
        name: one of :func:`available_colormaps` (case-insensitive).
        device: where the table lives; CPU by default.

    Returns:
        (256, 3) uint8, row ``i`` the colour of level ``i``. Cached per (name, device) and shared:
        do not modify it in place.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _BUILDERS:
        names = ", ".join(available_colormaps())
        raise ValueError(f"unknown colormap {name!r}; available: {names}")
    return _cached_lut(key, _device_key(device))


def _device_key(device: torch.device | str | None) -> torch.device:
    """The device, with the current CUDA device's index: one cache entry per device."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def colorize(heatmaps: Tensor, colormap: str = "jet") -> Tensor:
    """Colour heatmaps through a colour map's lookup table, on their device.

    The level of a value ``h`` is ``round(255 h)`` clamped to [0, 255] (NaN -> 0).

    Args:
        heatmaps: (B, K, H, W) (any ``(*, H, W)``) floating point in [0, 1].
        colormap: one of :func:`available_colormaps`.

    Returns:
        (B, K, 3, H, W) (``(*, 3, H, W)``) uint8 RGB.
    """
    if not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be floating point in [0, 1], got {heatmaps.dtype}")
    if heatmaps.ndim < 2:
        raise ValueError(f"heatmaps must be (*, H, W), got shape {tuple(heatmaps.shape)}")
    lut = colormap_lut(colormap, heatmaps.device)
    return lut[_levels(heatmaps)].movedim(-1, -3).contiguous()


def _levels(heatmaps: Tensor) -> Tensor:
    """int32 levels ``round(255 h)`` clamped to [0, 255] (NaN -> 0), the heatmaps' shape."""
    h = heatmaps.detach()
    h = h if h.dtype == torch.float64 else h.float()
    return h.mul(255).round_().clamp_(0, 255).nan_to_num_(0.0).to(torch.int32)


@lru_cache(maxsize=32)
def _blend_table(name: str, alpha: float, device: torch.device) -> Tensor:
    """(3, 256 * 256) uint8: entry ``[c, 256 * level + base]`` is channel ``c`` of the overlay
    of colour ``level`` on an image level ``base``, ``round(alpha * colour + (1 - alpha) * base)``
    in float64 (round half to even)."""
    with torch.inference_mode(False), torch.no_grad():
        colours = colormap_lut(name).T.double()[:, :, None]  # (3, 256 levels, 1)
        base = torch.arange(256, dtype=torch.float64)
        blend = (alpha * colours + (1 - alpha) * base).round_()  # a convex blend: in [0, 255]
        return blend.to(torch.uint8).reshape(3, -1).to(device)


def overlay(images: Tensor, heatmaps: Tensor, colormap: str = "jet", alpha: float = 0.5) -> Tensor:
    """Blend coloured heatmaps over their images: ``round(alpha * colour + (1 - alpha) * image)``.

    The blend is integer work: each output byte is one lookup, by (colour level, image level),
    in a table of that formula evaluated in float64 (round half to even) once per colour map and
    ``alpha``; no floating-point copy of the overlays is made, only the heatmaps' levels. (A
    float32 evaluation of the formula gives the same bytes at ``alpha`` 0.5, and can be one
    level off at other ``alpha``, for values within float32 rounding of a half.)

    Args:
        images: (B, 3, H, W) RGB, uint8 or floating point in [0, 1] (scaled to 0..255, rounded).
        heatmaps: (B, K, H, W) or (B, H, W) floating point in [0, 1], the images' size (resize
            them first with :func:`upsample` or :func:`heatmaps`; nothing is resized here).
        colormap: one of :func:`available_colormaps`.
        alpha: weight of the colour, in [0, 1].

    Returns:
        (B, K, 3, H, W) uint8 RGB, one overlay per image and map; channels-last in memory
        (``permute(0, 1, 3, 4, 2)`` is contiguous, the rows of an RGB picture) when the images
        are (``images.permute(0, 2, 3, 1)`` contiguous, as decoders give them), else contiguous.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")
    if not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be floating point in [0, 1], got {heatmaps.dtype}")
    if heatmaps.ndim == 3:
        heatmaps = heatmaps.unsqueeze(1)
    if heatmaps.ndim != 4:
        raise ValueError(
            f"heatmaps must be (B, K, H, W) or (B, H, W), got shape {tuple(heatmaps.shape)}"
        )
    if heatmaps.shape[0] != images.shape[0]:
        raise ValueError(
            f"batch size mismatch: {images.shape[0]} images, {heatmaps.shape[0]} heatmap sets"
        )
    if heatmaps.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"heatmaps are {tuple(heatmaps.shape[-2:])} but images are "
            f"{tuple(images.shape[-2:])}; overlay does not resize: upsample the maps first "
            "(postprocess.upsample / postprocess.heatmaps)"
        )
    if heatmaps.device != images.device:
        raise ValueError(f"images on {images.device} but heatmaps on {heatmaps.device}")
    if images.dtype == torch.uint8:
        base = images.detach()
    else:
        base = images.detach().float().clamp(0, 1).mul_(255).round_().to(torch.uint8)
    colormap_lut(colormap)  # the unknown-name error
    table = _blend_table(colormap.lower(), float(alpha), _device_key(heatmaps.device))
    rows = _levels(heatmaps).bitwise_left_shift_(8)  # (B, K, H, W): 256 * level
    batch, maps, height, width = rows.shape
    if base.permute(0, 2, 3, 1).is_contiguous():  # written as (B, K, H, W, 3): no transposing
        out = torch.empty((batch, maps, height, width, 3), dtype=torch.uint8, device=rows.device)
        planes, out = out.unbind(-1), out.permute(0, 1, 4, 2, 3)
    else:
        out = torch.empty((batch, maps, 3, height, width), dtype=torch.uint8, device=rows.device)
        planes = out.unbind(2)
    # One channel at a time: each gather reads one 64 KiB table, which stays in cache.
    for c, plane in enumerate(planes):
        index = rows + base[:, c, None]  # int32
        plane.copy_(table[c].index_select(0, index.view(-1)).view(index.shape))
    return out
