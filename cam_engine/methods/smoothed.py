"""Averaged-over-samples methods of torchcam 0.5: Smooth Grad-CAM++, SS-CAM and IS-CAM.

Options (``CAMEngine(method_options=...)``, :class:`NoiseOptions`): ``num_samples``, ``std``
(noise), and ``generator`` (a ``torch.Generator`` on the input's device) to make the noise
reproducible; without one the global RNG is used. As in torchcam, the noise is drawn in float32
(then cast to the input's dtype), one ``torch.randn`` call per pass, whatever ``batch_size``
(Smooth Grad-CAM++: the (B, C, H, W) input noise; SS-CAM: the (B, C', H, W) noise of all the
upsampled masks, C' the target map's channels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import postprocess
from ..gradients import explained_gradients
from ..layout import gradients_to_nchw, to_nchw
from ._registry import (
    Context,
    MethodOptions,
    check_count,
    check_number,
    register,
    register_weights,
    spatial_sum,
    weighted_sum,
)
from .perturbation import _chunks


@dataclass(frozen=True)
class NoiseOptions(MethodOptions):
    """``num_samples`` noisy passes, noise ``std``, and a ``generator`` for reproducible noise."""

    num_samples: int = 4
    std: float = 0.3
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        check_count("num_samples", self.num_samples)
        check_number("std", self.std)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {self.generator!r}")


@dataclass(frozen=True)
class SSCamOptions(NoiseOptions):
    """SS-CAM's defaults: 35 passes, mask noise std 2."""

    num_samples: int = 35
    std: float = 2.0


@dataclass(frozen=True)
class ISCamOptions(MethodOptions):
    """IS-CAM's ``num_samples`` (default 10) integration steps."""

    num_samples: int = 10

    def __post_init__(self) -> None:
        check_count("num_samples", self.num_samples)


def _noise(ctx: Context, shape: tuple[int, ...], std: float) -> Tensor:
    """N(0, std^2) of ``shape`` drawn (and scaled) in float32 as torchcam's ``Normal.sample``, in
    the input's dtype."""
    x, generator = ctx.x, ctx.options.generator
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=x.device) * std
    return noise.to(x.dtype)


@register("smoothgradcam++", options=NoiseOptions)
def smoothgradcam_plus_plus(ctx: Context) -> Tensor:
    """Smooth Grad-CAM++ (Omeiza et al., 2019) as torchcam 0.5's ``SmoothGradCAMpp`` computes it.

    For ``num_samples`` (default 4) noisy inputs ``x + N(0, std^2)`` (``std`` default 0.3) the
    gradients ``g`` of the target scores at the target layer are taken (closed form on a GAP head,
    else a backward through the head only). With ``D2 = mean(g^2)``, ``D3 = mean(g^3)`` and the
    clean map ``A``: ``alpha = D2 / (2 D2 + sum_positions(D3 A) + 1e-8)``. Like torchcam, whose
    hooks stay on during the noisy passes, the weights are ``sum_positions(alpha relu(g'))`` and
    the map ``ReLU(sum_c w_c A'_c)`` with ``g'``, ``A'`` the gradient and map of the *last* noisy
    input.

    Returns:
        (B, K, *s).
    """
    x, size = ctx.x, ctx.image_size
    samples, std = ctx.options.num_samples, ctx.options.std
    g2 = g3 = 0
    for _ in range(samples):
        noisy = x + _noise(ctx, tuple(x.shape), std)
        record = ctx.split.record(noisy, closed_form=ctx.closed_form is not None)
        with torch.enable_grad():
            grads = explained_gradients(record, ctx.targets)
        with torch.no_grad():
            grads = gradients_to_nchw(grads, ctx.reshape, size)
            g2, g3 = g2 + grads.pow(2), g3 + grads.pow(3)
    with torch.no_grad():
        g2, g3 = g2 / samples, g3 / samples
        alpha = g2 / (2 * g2 + spatial_sum(g3 * ctx.activations[:, None], 3) + 1e-8)
        weights = (alpha * grads.relu()).sum(dim=tuple(range(3, alpha.ndim)))
        last = to_nchw(record.features.detach(), ctx.reshape, size)
        return weighted_sum(weights, last).relu()


def _mask_weights(
    ctx: Context,
    passes: int,
    masked: Callable[[int, Tensor, Tensor], Tensor],
    mask_std: float | None = None,
) -> Tensor:
    """torchcam's Score-CAM weights averaged over ``passes``: softmax over channels of the mean
    of ``score(masked(pass, x_rows, masks)) - score(x)``.

    Each channel of ``A`` is min-max normalised, upsampled to the input size (half-pixel centres,
    unlike pytorch-grad-cam's Score-CAM), given N(0, mask_std^2) noise when ``mask_std`` is set
    (one draw of all the masks' noise per pass) and handed to ``masked`` ``ctx.batch_size`` at a
    time.

    Returns:
        weights (B, K, C).
    """
    a, x = ctx.activations, ctx.x
    batch, channels = a.shape[:2]
    low = postprocess.normalize(a, eps=1e-8)  # torchcam's epsilon, kept for parity
    mode = "bilinear" if a.ndim == 4 else "trilinear"
    baseline = ctx.scores(ctx.logits, ctx.rows)  # (B, K)
    total = 0
    with torch.no_grad():
        for n in range(passes):
            scores = []
            noise = (
                None if mask_std is None else _noise(ctx, (batch, channels, *x.shape[2:]), mask_std)
            )
            for idx in _chunks(batch * channels, ctx.batch_size, x.device):
                rows, chans = idx // channels, idx % channels
                masks = F.interpolate(low[rows, chans][:, None], x.shape[2:], mode=mode)
                if noise is not None:
                    masks = masks + noise[rows, chans][:, None]
                out = ctx.split.predict(masked(n, x[rows], masks))
                scores.append(ctx.scores(out, rows) - baseline[rows])
            total = total + torch.cat(scores)
    return (total / passes).view(batch, channels, -1).softmax(dim=1).transpose(1, 2)


@register_weights("sscam", options=SSCamOptions)
def sscam(ctx: Context) -> Tensor:
    """SS-CAM (Wang et al., 2020) as torchcam 0.5's ``SSCAM``: Score-CAM weights averaged over
    ``num_samples`` (default 35) passes whose upsampled masks get ``N(0, std^2)`` noise (``std``
    default 2.0) added before they multiply the input.

    Returns:
        weights (B, K, C).
    """

    def masked(_: int, images: Tensor, masks: Tensor) -> Tensor:
        return images * masks

    return _mask_weights(ctx, ctx.options.num_samples, masked, ctx.options.std)


@register_weights("iscam", options=ISCamOptions)
def iscam(ctx: Context) -> Tensor:
    """IS-CAM (Naidu et al., 2020) as torchcam 0.5's ``ISCAM``: Score-CAM weights averaged over
    ``num_samples`` (default 10) passes; pass ``i`` (from 0) scales the masked input by torchcam's
    running coefficient ``sum_{j <= i} (j + 1) / num_samples``.

    Returns:
        weights (B, K, C).
    """
    samples = ctx.options.num_samples
    coeffs = list(accumulate((j + 1) / samples for j in range(samples)))

    def masked(n: int, images: Tensor, masks: Tensor) -> Tensor:
        return coeffs[n] * (masks * images)

    return _mask_weights(ctx, samples, masked)
