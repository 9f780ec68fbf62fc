"""Guided backpropagation (Springenberg et al., 2015) and Guided Grad-CAM, without hooks.

The model is traced once and rebuilt with every ReLU (``nn.ReLU`` modules, ``F.relu`` /
``torch.relu`` and ``.relu()`` calls, in place or not) replaced by :class:`GuidedReLU`, whose
backward passes only positive gradients through positive inputs. Hook-based versions
(pytorch-grad-cam, captum) replace ``nn.ReLU`` modules only, so they equal this one on models
whose ReLUs are all modules (ResNet, VGG).
"""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .. import postprocess
from ..graph import trace
from ..model import select_output
from ._registry import Context, register
from .fullgrad import _state
from .gradcam import gradcam

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward ``grad * (input > 0) * (grad > 0)``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (grad > 0)).to(grad.dtype)


def guided_relu(x: Tensor, *args, **kwargs) -> Tensor:
    """:class:`GuidedReLU`; extra arguments (``inplace``) are ignored."""
    return GuidedReLU.apply(x)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def guided_model(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with every ReLU guided; built once per model and mode, weights shared."""
    per_model = _CACHE.setdefault(model, {})
    key = _state(model)
    if key not in per_model:
        graph, notes = trace(model)
        if graph is None:
            raise ValueError("guided methods need a model torch.fx can trace: " + "; ".join(notes))
        gm = graph.module
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            if _is_relu(node, modules):
                with gm.graph.inserting_after(node):
                    guided = gm.graph.call_function(guided_relu, (node.args[0],))
                node.replace_all_uses_with(guided)
                gm.graph.erase_node(node)
        gm.recompile()
        per_model[key] = gm
    return per_model[key]


def guided_gradients(ctx: Context) -> Tensor:
    """Guided gradient of each explained score w.r.t. the input: (B, K, C, H, W)."""
    gm = guided_model(ctx.model)
    x = ctx.x.detach().requires_grad_(True)
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.enable_grad():
        scores = ctx.scores(select_output(gm(x), ctx.cam_model.output), rows)
    k = scores.shape[1]
    grads = [
        torch.autograd.grad(scores[:, i].sum(), x, retain_graph=i + 1 < k)[0] for i in range(k)
    ]
    return torch.stack(grads, 1)


def _saliency(guided: Tensor) -> Tensor:
    return guided.abs().amax(dim=2)


@register("guided-backprop", needs_context=True, uses_gradients=False, input_maps=True)
def guided_backprop(ctx: Context) -> Tensor:
    """Guided backpropagation: ``ctx.guided`` (B, K, C, H, W) = guided input gradients.

    Returns:
        (B, K, H, W): the largest absolute value over the input channels (the usual saliency
        picture); the signed gradients are ``CAMResult.guided``.
    """
    ctx.guided = guided_gradients(ctx)
    return _saliency(ctx.guided)


@register("guided-gradcam", needs_context=True, input_maps=True)
def guided_gradcam(ctx: Context) -> Tensor:
    """Guided Grad-CAM: guided gradients times the upsampled, normalised Grad-CAM heatmap.

    ``ctx.guided`` (B, K, C, H, W) = guided gradient * heatmap (pytorch-grad-cam's recipe:
    ``cam_mask * gb``). captum's ``GuidedGradCam`` multiplies by the raw Grad-CAM map upsampled
    with nearest neighbours instead; both are this guided gradient times a Grad-CAM map.

    Returns:
        (B, K, H, W): largest absolute value over the input channels.
    """
    with torch.no_grad():
        heat = postprocess.heatmaps(gradcam(ctx.activations, ctx.gradients), ctx.x.shape[2:])
    ctx.guided = guided_gradients(ctx) * heat[:, :, None].to(ctx.x.dtype)
    return _saliency(ctx.guided)
