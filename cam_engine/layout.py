"""Layouts of target maps: token maps (ViT) and channels-last maps (Swin) laid out as (B, C, h, w).

Every method reads the target map and its gradients channels-first; :func:`to_nchw` and
:func:`gradients_to_nchw` turn the layer's own layout into that one, inferred from the shape and
the image's aspect ratio unless ``reshape`` says it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

__all__ = ["Reshape", "check_reshape", "token_grid", "to_nchw", "gradients_to_nchw"]

Reshape = str | Callable[[Tensor], Tensor] | None
_RESHAPES = ("vit", "swin", "none")


def check_reshape(reshape: Reshape) -> None:
    """``ValueError`` unless ``reshape`` is None, a callable or one of 'vit', 'swin', 'none'."""
    if not (reshape is None or callable(reshape) or reshape in _RESHAPES):
        raise ValueError(f"unknown reshape {reshape!r}; use 'vit', 'swin', 'none' or a callable")


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) with h*w == tokens and h/w equal to the image's aspect ratio, if any."""
    height, width = size
    h = round(math.sqrt(tokens * height / width))
    for cand in (h, h - 1, h + 1):
        if cand > 0 and tokens % cand == 0 and _aspect_matches((cand, tokens // cand), size):
            return cand, tokens // cand
    return None


def _aspect_matches(hw: tuple[int, int], size: tuple[int, int]) -> bool:
    (h, w), (height, width) = hw, size
    return abs(math.log((h / w) / (height / width))) < math.log(1.5)


def to_nchw(features: Tensor, reshape: Reshape, image_size: tuple[int, int]) -> Tensor:
    """Feature map (or a gradient of it) in (..., C, h, w) layout.

    Args:
        features: ``(N, C, h, w)`` or ``(N, C, d, h, w)``; ``(N, H, W, C)`` (Swin); or tokens
            ``(N, T, C)`` (ViT),
            where ``T = prefix + h*w`` and the prefix (class / distillation tokens) is dropped.
        reshape: ``"vit"`` (one class token), ``"swin"`` (channels last), ``"none"`` (already
            NCHW), a callable, or ``None`` to infer the layout from the shape and the image size.
        image_size: (H, W) of the input image, used to infer h and w.
    """
    if callable(reshape):
        return reshape(features)
    if features.ndim == 3:
        # inferred: the fewest prefix tokens (class, distillation, registers) leaving a grid
        prefixes = (1,) if reshape == "vit" else range(0, min(9, features.shape[1] - 3))
        for prefix in prefixes:
            grid = token_grid(features.shape[1] - prefix, image_size)
            if grid is not None:
                tokens = features[:, prefix:]
                return tokens.reshape(features.shape[0], *grid, -1).permute(0, 3, 1, 2)
        raise ValueError(
            f"cannot lay {features.shape[1]} tokens out on a grid for an image of size "
            f"{image_size}; pass reshape=callable"
        )
    if features.ndim == 5 and reshape in (None, "none"):
        return features  # volumes: (N, C, d, h, w)
    if features.ndim != 4:
        raise ValueError(
            f"the target layer's output has shape {tuple(features.shape)}; expected (B, C, h, w), "
            "(B, h, w, C) or tokens (B, T, C)"
        )
    if reshape == "none":
        return features
    channels_last = reshape == "swin" or (
        reshape is None
        and _aspect_matches(tuple(features.shape[1:3]), image_size)
        and not _aspect_matches(tuple(features.shape[2:4]), image_size)
    )
    return features.permute(0, 3, 1, 2) if channels_last else features


def gradients_to_nchw(grads: Tensor, reshape: Reshape, image_size: tuple[int, int]) -> Tensor:
    """:func:`to_nchw` of per-target gradients: (B, K, *F) in the layer's layout to
    (B, K, C, *s)."""
    return to_nchw(grads.flatten(0, 1), reshape, image_size).unflatten(0, grads.shape[:2])
