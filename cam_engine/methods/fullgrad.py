"""FullGrad (Srinivas & Fleuret, 2019), as pytorch-grad-cam 1.5.7 computes it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .. import postprocess
from ..rewrites import bias_graph
from ._registry import Context, first_component, register


def _bias(module: nn.Module) -> Tensor:
    """The layer's bias; for BatchNorm the bias of its affine form in eval mode."""
    if isinstance(module, nn.BatchNorm2d):
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return (module.bias - module.running_mean * scale).detach()
    return module.bias.detach()


_PEER_EPS = 1e-7  # pytorch-grad-cam's ``scale_cam_image``, kept for parity (see fullgrad)


def _terms(ctx: Context) -> Iterator[list[Tensor]]:
    """Per target, FullGrad's normalised maps at the input size: ``|x * dS/dx|`` per input
    channel (B, 3, H, W), then each bias layer's channel sum (B, 1, H, W).

    Every map is min-max normalised per image and channel with pytorch-grad-cam's
    ``(m - min) / (max - min + 1e-7)``: part of its FullGrad, which sums hundreds of such maps,
    so the epsilon weighs on small-gradient layers. Upsampling is linear, so each layer's channel
    sum is taken before upsampling (one resize per layer, not per channel).
    """
    gm, layers = bias_graph(ctx.split.model)
    x = ctx.x.detach().requires_grad_(True)
    with torch.enable_grad():
        output, taps = gm(x)
        totals = ctx.scores(ctx.split.select(output), ctx.rows).sum(0).unbind()  # K scalars
    size = tuple(x.shape[2:])
    for k in range(len(totals)):
        grad_x, *grads = torch.autograd.grad(
            totals[k], [x, *taps], retain_graph=k + 1 < len(totals)
        )
        with torch.no_grad():
            terms = [postprocess.normalize((grad_x * x).abs(), eps=_PEER_EPS)]
            for layer, grad in zip(layers, grads, strict=True):
                products = (_bias(layer).to(grad.dtype)[:, None, None] * grad).abs()
                summed = postprocess.normalize(products, eps=_PEER_EPS).sum(1, keepdim=True)
                terms.append(postprocess.upsample(summed, size))
        yield terms


def _eigen_map(ctx: Context) -> Tensor:
    """pytorch-grad-cam's FullGrad with ``eigen_smooth``: the maps of :func:`_terms` normalised
    again, resized to 1/8 of the input size, projected on their first principal component
    (:func:`first_component`, sign fixed), normalised and resized back.

    Returns:
        (B, K, H, W) in [0, 1].
    """
    size = ctx.image_size
    low = (size[0] // 8, size[1] // 8)
    maps = []
    for terms in _terms(ctx):
        with torch.no_grad():
            stacked = postprocess.normalize(torch.cat(terms, 1), eps=_PEER_EPS)
            projection = first_component(postprocess.upsample(stacked, low)[:, None])
            maps.append(
                postprocess.upsample(postprocess.normalize(projection, eps=_PEER_EPS), size)
            )
    return torch.cat(maps, 1)


@register("fullgrad", two_d_only=True, eigen_map=_eigen_map)
def fullgrad(ctx: Context) -> Tensor:
    """Sum of the normalised ``|x * dS/dx|`` and, for every Conv2d / BatchNorm2d with a bias,
    of the normalised, upsampled ``|b * dS/dz|`` summed over channels (see :func:`_terms`).

    The target layer is not used.

    Returns:
        (B, K, H, W) at the input's size, non-negative.
    """
    return torch.stack([sum(t.sum(1) for t in terms) for terms in _terms(ctx)], 1)
