"""FullGrad (Srinivas & Fleuret, 2019), as pytorch-grad-cam 1.5.7 computes it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import postprocess
from ..rewrites import bias_graph
from ._registry import Context, register


def _bias(module: nn.Module) -> Tensor:
    """The layer's bias; for BatchNorm the bias of its affine form in eval mode."""
    if isinstance(module, nn.BatchNorm2d):
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return (module.bias - module.running_mean * scale).detach()
    return module.bias.detach()


_PEER_EPS = 1e-7  # pytorch-grad-cam's ``scale_cam_image``, kept for parity (see fullgrad)


@register("fullgrad", two_d_only=True)
def fullgrad(ctx: Context) -> Tensor:
    """Sum of the normalised ``|x * dS/dx|`` and, for every Conv2d / BatchNorm2d with a bias,
    of the normalised, upsampled ``|b * dS/dz|`` summed over channels.

    The target layer is not used. Every map is min-max normalised per image and channel with
    pytorch-grad-cam's ``(m - min) / (max - min + 1e-7)``: part of its FullGrad, which sums
    hundreds of such maps, so the epsilon weighs on small-gradient layers. Upsampling is linear,
    so each layer's channel sum is taken before upsampling (one resize per layer, not per
    channel).

    Returns:
        (B, K, H, W) at the input's size, non-negative.
    """
    gm, layers = bias_graph(ctx.split.model)
    x = ctx.x.detach().requires_grad_(True)
    with torch.enable_grad():
        output, taps = gm(x)
        scores = ctx.scores(ctx.split.select(output), ctx.rows)
    size = tuple(x.shape[2:])
    maps = []
    for k in range(scores.shape[1]):
        grad_x, *grads = torch.autograd.grad(
            scores[:, k].sum(), [x, *taps], retain_graph=k + 1 < scores.shape[1]
        )
        with torch.no_grad():
            total = postprocess.normalize((grad_x * x).abs(), eps=_PEER_EPS).sum(1)
            for layer, grad in zip(layers, grads, strict=True):
                terms = (_bias(layer).to(grad.dtype)[:, None, None] * grad).abs()
                summed = postprocess.normalize(terms, eps=_PEER_EPS).sum(1, keepdim=True)
                total = total + postprocess.upsample(summed, size)[:, 0]
        maps.append(total)
    return torch.stack(maps, 1)
