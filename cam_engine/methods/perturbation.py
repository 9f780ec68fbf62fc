"""Perturbation methods: Score-CAM and Ablation-CAM, batched on the model's device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import postprocess
from ._registry import Context, register_weights

ABLATION_OFFSET = 1e7  # pytorch-grad-cam's AblationLayer: min(A) - 1e7 when min(A) != 0


def _chunks(total: int, size: int, device: torch.device):
    for start in range(0, total, size):
        yield torch.arange(start, min(start + size, total), device=device)


@register_weights("scorecam")
def scorecam(ctx: Context) -> Tensor:
    """Score-CAM (Wang et al., 2020): channel weights from the scores of masked inputs.

    Each channel of ``A`` is upsampled to the input size and min-max normalised (``+1e-8``, as
    pytorch-grad-cam), the input is multiplied by it, and the softmax over channels of the target
    scores of these B*C images are the weights. The masks are upsampled with
    ``align_corners=True`` (pytorch-grad-cam's ``UpsamplingBilinear2d``), unlike the heatmaps
    (half-pixel centres). Masked inputs are built and scored ``ctx.batch_size`` at a time on the
    device, B*C in all, whatever the batch; only one chunk of masks is in memory at once.

    Returns:
        weights (B, K, C).
    """
    a, x = ctx.activations, ctx.x
    batch, channels = a.shape[:2]
    mode = "bilinear" if a.ndim == 4 else "trilinear"
    scores = []
    with torch.no_grad():
        for idx in _chunks(batch * channels, ctx.batch_size, x.device):
            rows, chans = idx // channels, idx % channels
            low = a[rows, chans][:, None]
            masks = F.interpolate(low, x.shape[2:], mode=mode, align_corners=True)
            # pytorch-grad-cam's epsilon, kept for parity with its masks
            masks = postprocess.normalize(masks, eps=1e-8)
            out = ctx.split.predict(x[rows] * masks)
            scores.append(ctx.scores(out, rows))
    return torch.cat(scores).view(batch, channels, -1).softmax(dim=1).transpose(1, 2)


@register_weights("ablationcam")
def ablationcam(ctx: Context) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy, 2020): ``w_k = (s - s_k) / s``, ``s_k`` the score with
    channel k of ``A`` ablated.

    Ablating a channel of ``A`` changes only the head's input, so only the split's head runs on the
    ablated maps (``ctx.batch_size`` at a time): the trunk (everything up to the target layer)
    runs once per batch instead of once per channel, which pytorch-grad-cam does (it caches the
    target layer's output but still runs the layers before it for every ablated copy). On a
    global-average-pool -> linear head nothing runs at all: ``s_k = s - W[c, k] (mean(A_k) - v)``.

    The ablated channel is set to ``v = 0`` when the image's map has minimum 0 (after a ReLU), else
    to ``min(A) - 1e7`` (pytorch-grad-cam's ``AblationLayer``; its running minimum over the
    already-ablated copies of a chunk is not reproduced). Token maps are ablated over every token,
    class token included (``AblationLayerVit``).

    Returns:
        weights (B, K, C).
    """
    a, native = ctx.activations, ctx.native
    batch, channels = a.shape[:2]
    lo = native.flatten(1).amin(1)
    value = torch.where(lo == 0, torch.zeros_like(lo), lo - ABLATION_OFFSET)  # (B,)
    original = ctx.scores(ctx.logits, ctx.rows)  # (B, K)
    if ctx.closed_form is not None and native.shape == a.shape:
        rows = ctx.closed_form.weight.detach().to(a.dtype)[ctx.classes]  # (B, K, C)
        change = a.flatten(2).mean(-1) - value[:, None]  # (B, C)
        ablated = original[..., None] - rows * change[:, None]
    else:
        channel_dim = 1 if native.shape == a.shape else native.ndim - 1
        scores = []
        for idx in _chunks(batch * channels, ctx.batch_size, a.device):
            rows, chans = idx // channels, idx % channels
            maps = native[rows].movedim(channel_dim, 1).clone()
            maps[torch.arange(len(idx), device=a.device), chans] = (
                value[rows].view(-1, *[1] * (maps.ndim - 2)).to(maps.dtype)
            )
            out = ctx.split.head(maps.movedim(1, channel_dim), rows)
            scores.append(ctx.scores(out, rows))
        ablated = torch.cat(scores).view(batch, channels, -1).transpose(1, 2)
    return (original[..., None] - ablated) / original[..., None]
