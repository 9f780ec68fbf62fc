"""Hook-based CAM / Grad-CAM, written the way tutorials write it.

This module is the *reference* the hook-free engine is tested and benchmarked against, so it is
deliberately naive and deliberately independent: it imports nothing from ``cam_engine`` and carries
its own upsampling and normalisation. Grad-CAM here runs a full forward and a full
``loss.backward()`` per explained class, computing every parameter's gradient, which is exactly the
cost the engine exists to avoid.

Shapes: ``x`` is (B, 3, H, W); the target module outputs A of shape (B, C, h, w); the model outputs
logits (B, N); ``classes`` is normalised to (B, K) long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HookGradCAM", "ReferenceResult", "reference_cam", "reference_gradcam"]

Classes = int | Sequence[int] | Sequence[Sequence[int]] | Tensor | None


class ReferenceResult(NamedTuple):
    """Output of the reference methods.

    cams: (B, K, h, w) maps after the ReLU, at the target layer's resolution.
    heatmaps: (B, K, H, W) ``cams`` bilinearly upsampled to the input size, each map min-max
        normalised to [0, 1] (a flat map becomes zeros).
    logits: (B, N) model output of the first forward pass.
    classes: (B, K) long, the explained classes (top-1 when none were given).
    """

    cams: Tensor
    heatmaps: Tensor
    logits: Tensor
    classes: Tensor


def _first(output: object) -> Tensor:
    # GoogLeNet / Inception return (named)tuples in train mode; the main logits come first.
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"expected the module to output a tensor, got {type(output).__name__}")
    return output


def _as_classes(classes: Classes, logits: Tensor) -> Tensor:
    """Normalise ``classes`` to (B, K) long on the logits' device; ``None`` -> top-1."""
    b = logits.shape[0]
    if classes is None:
        return logits.detach().argmax(dim=1, keepdim=True)
    c = torch.as_tensor(classes, dtype=torch.long, device=logits.device)
    if c.ndim == 0:
        c = c.expand(b)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2 or c.shape[0] != b:
        raise ValueError(f"classes must broadcast to (B={b}, K), got shape {tuple(c.shape)}")
    return c


def _upsample_normalise(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) -> (B, K, H, W): bilinear (align_corners=False), then per-map min-max."""
    up = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(2, 3), keepdim=True)
    span = up.amax(dim=(2, 3), keepdim=True) - lo
    # No epsilon: an exact reference; a flat map (span == 0) is defined as all zeros.
    return torch.where(span > 0, (up - lo) / torch.where(span > 0, span, 1), 0)


def _check_activation(a: Tensor | None) -> Tensor:
    if a is None:
        raise RuntimeError("the target module was not called during the forward pass")
    if a.ndim != 4:
        raise ValueError(f"expected a (B, C, h, w) activation, got shape {tuple(a.shape)}")
    return a


class HookGradCAM:
    """Classic Grad-CAM (Selvaraju et al. 2017) with a forward hook and a full backward hook.

    Hooks live only for the duration of a call; parameter ``.grad`` is reset to ``None`` afterwards
    so no state is left on the model. The model's train/eval mode is left as the caller set it.
    As with any ``register_full_backward_hook`` user, a target whose input or output is later
    modified in place (e.g. the BatchNorm before an ``inplace=True`` ReLU) makes autograd raise.
    """

    def __init__(self, model: nn.Module, target_module: nn.Module) -> None:
        self.model = model
        self.target_module = target_module

    def __call__(self, x: Tensor, classes: Classes = None) -> ReferenceResult:
        """Grad-CAM of ``x`` (B, 3, H, W) for ``classes`` (B, K); one forward+backward per k."""
        store: dict[str, Tensor] = {}

        def fwd_hook(_m: nn.Module, _inp: object, out: object) -> None:
            store["act"] = _first(out).detach()

        def bwd_hook(_m: nn.Module, _gin: object, gout: tuple[Tensor, ...]) -> None:
            store["grad"] = gout[0].detach()

        params = list(self.model.parameters())
        # A detached copy so the caller's x never accumulates a .grad; it only needs grad itself
        # when the whole model is frozen, otherwise no graph would reach the target module.
        x_in = x.detach()
        if not any(p.requires_grad for p in params):
            x_in = x_in.requires_grad_(True)

        handles = [
            self.target_module.register_forward_hook(fwd_hook),
            self.target_module.register_full_backward_hook(bwd_hook),
        ]
        try:
            cams: list[Tensor] = []
            first_logits: Tensor | None = None
            cls: Tensor | None = None
            k = 0
            while cls is None or k < cls.shape[1]:
                store.clear()
                with torch.enable_grad():
                    logits = _first(self.model(x_in))
                    if cls is None:
                        cls = _as_classes(classes, logits)
                        first_logits = logits.detach()
                    one_hot = torch.zeros_like(logits)
                    one_hot.scatter_(1, cls[:, k : k + 1], 1.0)
                    loss = (logits * one_hot).sum()
                    self.model.zero_grad(set_to_none=True)
                    loss.backward()
                act = _check_activation(store.get("act"))
                if "grad" not in store:
                    raise RuntimeError("no gradient reached the target module")
                weights = store["grad"].mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
                cams.append(torch.relu((weights * act).sum(dim=1)))  # (B, h, w)
                k += 1
        finally:
            for h in handles:
                h.remove()
            for p in params:
                p.grad = None

        assert first_logits is not None and cls is not None
        cam = torch.stack(cams, dim=1)
        return ReferenceResult(cam, _upsample_normalise(cam, x.shape[-2:]), first_logits, cls)


def reference_gradcam(
    model: nn.Module, target_module: nn.Module, x: Tensor, classes: Classes = None
) -> ReferenceResult:
    """Functional form of :class:`HookGradCAM`: cams (B, K, h, w), heatmaps (B, K, H, W)."""
    return HookGradCAM(model, target_module)(x, classes)


@torch.no_grad()
def reference_cam(
    model: nn.Module,
    target_module: nn.Module,
    fc: nn.Linear,
    x: Tensor,
    classes: Classes = None,
) -> ReferenceResult:
    """Classic CAM (Zhou et al. 2016): ``cam_k = relu(sum_c fc.weight[class_k, c] * A[:, c])``.

    ``target_module`` must produce the (B, C, h, w) map that is global-average-pooled into ``fc``
    (C == fc.in_features). The bias is left out, as in the paper; the ReLU matches the output of
    pytorch-grad-cam style libraries.
    """
    store: dict[str, Tensor] = {}

    def fwd_hook(_m: nn.Module, _inp: object, out: object) -> None:
        store["act"] = _first(out).detach()

    handle = target_module.register_forward_hook(fwd_hook)
    try:
        logits = _first(model(x)).detach()
    finally:
        handle.remove()
    act = _check_activation(store.get("act"))
    if act.shape[1] != fc.in_features:
        raise ValueError(f"activation has {act.shape[1]} channels, fc expects {fc.in_features}")
    cls = _as_classes(classes, logits)
    w = fc.weight.detach()[cls].to(act.dtype)  # (B, K, C)
    cam = torch.relu(torch.einsum("bkc,bchw->bkhw", w, act))
    return ReferenceResult(cam, _upsample_normalise(cam, x.shape[-2:]), logits, cls)
