"""FullGrad (Srinivas & Fleuret, 2019), as pytorch-grad-cam 1.5.7 computes it."""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import postprocess
from ..graph import trace
from ..model import select_output
from ._registry import Context, register

_BIAS_TYPES = (nn.Conv2d, nn.BatchNorm2d)  # exact types, as pytorch-grad-cam selects them
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(model: nn.Module) -> tuple:
    p = next(model.parameters())
    return model.training, p.device, p.dtype


def bias_graph(model: nn.Module) -> tuple[fx.GraphModule, list[nn.Module]]:
    """``model`` traced to return ``(output, (z_1, ..., z_L))``, the outputs of every Conv2d /
    BatchNorm2d with a bias, and those modules.

    Each ``z_i`` is kept apart from its users by a copy, so in-place ops after it (a ReLU with
    ``inplace=True``) do not change it and ``autograd.grad(score, z_i)`` is dScore/dz_i. Built
    once per model and mode (weights are shared, not copied).
    """
    per_model = _CACHE.setdefault(model, {})
    key = _state(model)
    if key not in per_model:
        graph, notes = trace(model)
        if graph is None:
            raise ValueError("fullgrad needs a model torch.fx can trace: " + "; ".join(notes))
        gm = graph.module
        modules = dict(gm.named_modules())
        taps, layers = [], []
        for node in list(gm.graph.nodes):
            module = modules.get(node.target) if node.op == "call_module" else None
            if type(module) in _BIAS_TYPES and module.bias is not None:
                with gm.graph.inserting_after(node):
                    copy = gm.graph.call_method("clone", (node,))
                node.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
                taps.append(node)
                layers.append(module)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        output.args = ((output.args[0], tuple(taps)),)
        gm.recompile()
        per_model[key] = (gm, layers)
    return per_model[key]


def _bias(module: nn.Module) -> Tensor:
    """The layer's bias; for BatchNorm the bias of its affine form in eval mode."""
    if isinstance(module, nn.BatchNorm2d):
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return (module.bias - module.running_mean * scale).detach()
    return module.bias.detach()


_PEER_EPS = 1e-7  # pytorch-grad-cam's ``scale_cam_image``, kept for parity (see fullgrad)


@register("fullgrad", needs_context=True, uses_gradients=False, input_maps=True, two_d_only=True)
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
    gm, layers = bias_graph(ctx.model)
    x = ctx.x.detach().requires_grad_(True)
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.enable_grad():
        output, taps = gm(x)
        scores = ctx.scores(select_output(output, ctx.cam_model.output), rows)
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
