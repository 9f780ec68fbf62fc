"""Guided backpropagation (Springenberg et al., 2015) and Guided Grad-CAM, without hooks.

The model is traced once and rebuilt with every ReLU (``nn.ReLU`` modules, ``F.relu`` /
``torch.relu`` and ``.relu()`` calls, in place or not) replaced by :class:`GuidedReLU`, whose
backward passes only positive gradients through positive inputs. Hook-based versions
(pytorch-grad-cam, captum) replace ``nn.ReLU`` modules only, so they equal this one on models
whose ReLUs are all modules (ResNet, VGG).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import postprocess
from ..rewrites import GuidedReLU, guided_model
from ._registry import Context, MethodOutput, get, register

__all__ = ["GuidedReLU", "guided_gradients", "guided_backprop", "guided_gradcam"]


def guided_gradients(ctx: Context) -> Tensor:
    """Guided gradient of each explained score w.r.t. the input: (B, K, C, H, W)."""
    gm = guided_model(ctx.split.model)
    x = ctx.x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = ctx.scores(ctx.split.select(gm(x)), ctx.rows)
    k = scores.shape[1]
    grads = [
        torch.autograd.grad(scores[:, i].sum(), x, retain_graph=i + 1 < k)[0] for i in range(k)
    ]
    return torch.stack(grads, 1)


def _saliency(guided: Tensor) -> Tensor:
    return guided.abs().amax(dim=2)


@register("guided-backprop")
def guided_backprop(ctx: Context) -> MethodOutput:
    """Guided backpropagation: ``guided`` (B, K, C, H, W) = guided input gradients.

    Returns:
        cams (B, K, H, W): the largest absolute value over the input channels (the usual
        saliency picture); the signed gradients are ``guided`` (``CAMResult.guided``).
    """
    guided = guided_gradients(ctx)
    return MethodOutput(_saliency(guided), guided)


@register("guided-gradcam", needs_gradients=True)
def guided_gradcam(ctx: Context) -> MethodOutput:
    """Guided Grad-CAM: guided gradients times the upsampled, normalised Grad-CAM heatmap.

    ``guided`` (B, K, C, H, W) = guided gradient * heatmap (pytorch-grad-cam's recipe:
    ``cam_mask * gb``). captum's ``GuidedGradCam`` multiplies by the raw Grad-CAM map upsampled
    with nearest neighbours instead; both are this guided gradient times a Grad-CAM map.

    Returns:
        cams (B, K, H, W): largest absolute value over the input channels, and ``guided``.
    """
    with torch.no_grad():
        cams = get("gradcam").run(ctx).cams
        heat = postprocess.heatmaps(cams, ctx.image_size)
    guided = guided_gradients(ctx) * heat[:, :, None].to(ctx.x.dtype)
    return MethodOutput(_saliency(guided), guided)
