"""Tests for the hook-based reference CAM / Grad-CAM against independent oracles.

Oracles: pytorch-grad-cam's GradCAM, and hand-written float64 computations on manually split
torchvision models (``torch.autograd.grad`` w.r.t. the split feature map, ``einsum`` with the FC).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import calibrate_bn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision import models

from cam_engine.reference import HookGradCAM, ReferenceResult, reference_cam, reference_gradcam

# resnet18 / vgg11_bn -> 3x3 maps, upsampled x32: no output pixel centre lands on an interior
# source pixel, so peaks are blurred and normalising after upsampling (not before) matters.
SIZE = 96


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(models, name)(weights=None)
    if name.startswith("vgg"):
        # Same layout (Linear-ReLU-Dropout x2 -> Linear) but 64 wide: the stock 4096-wide head is
        # 1 GB of float64 parameters and their gradients, and would dominate the test time.
        c = model.classifier
        c[0], c[3] = nn.Linear(c[0].in_features, 64), nn.Linear(64, 64)
        c[6] = nn.Linear(64, c[6].out_features)
    model = model.double()
    return calibrate_bn(model, torch.randn(8, 3, SIZE, SIZE, dtype=torch.float64))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).double()


def _grad_cam_lib(model: nn.Module, layer: nn.Module, x: torch.Tensor, cls: list[int]):
    with GradCAM(model=model, target_layers=[layer]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in cls])
    for p in model.parameters():  # the library leaves gradients behind
        p.grad = None
    assert out.dtype == np.float32  # its cv2.resize step runs in float32 whatever the model's dtype
    return torch.from_numpy(out).double()  # (B, H, W)


def _resnet_split(m: nn.Module):
    def trunk(x):
        y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(y))))

    return m.layer4, trunk, lambda a: m.fc(torch.flatten(m.avgpool(a), 1))


def _vgg_split(m: nn.Module):
    # Target: the last MaxPool (the ReLU before it is in-place, which breaks backward hooks).
    # The head (Linear-ReLU-Linear...) is non-linear, so Grad-CAM has no closed form here.
    return m.features[-1], m.features, lambda a: m.classifier(torch.flatten(m.avgpool(a), 1))


CLASSES = torch.tensor([[3, 917], [42, 0]])  # (B=2, K=2)


class Case(NamedTuple):
    model: nn.Module
    layer: nn.Module
    feats: torch.Tensor  # (B, C, h, w) target activation from the hand-split trunk
    head: Callable[[torch.Tensor], torch.Tensor]  # feats -> logits
    ref: ReferenceResult  # reference_gradcam(model, layer, x, CLASSES)
    lib: torch.Tensor  # (B, K, H, W) pytorch-grad-cam heatmaps, one call per k


def _build_case(model: nn.Module, split, x: torch.Tensor) -> Case:
    layer, trunk, head = split(model)
    ref = reference_gradcam(model, layer, x, CLASSES)
    lib = torch.stack([_grad_cam_lib(model, layer, x, c.tolist()) for c in CLASSES.T], dim=1)
    with torch.no_grad():
        feats = trunk(x)
    return Case(model, layer, feats, head, ref, lib)


# Module-scoped and shared: float64 forward+backward on CPU is what this file spends its time on.
@pytest.fixture(scope="module")
def resnet_case(x) -> Case:
    return _build_case(_make("resnet18"), _resnet_split, x)


@pytest.fixture(scope="module")
def vgg_case(x) -> Case:
    return _build_case(_make("vgg11_bn"), _vgg_split, x)


@pytest.fixture(params=["resnet", "vgg"])
def case(request) -> Case:
    return request.getfixturevalue(f"{request.param}_case")


# pytorch-grad-cam normalises with `/(max + 1e-7)` before *and* after a float32 cv2.resize;
# resize is linear and preserves constants, so both normalisations collapse to ours up to the
# epsilon and float32 rounding: measured max |diff| ~2e-7 here; 1e-5 leaves room for other builds.
LIB_ATOL = 1e-5


def test_gradcam_matches_pytorch_grad_cam(case):
    assert case.ref.heatmaps.shape == (2, 2, SIZE, SIZE)
    assert case.ref.cams.shape == (2, 2, 3, 3)
    assert torch.equal(case.ref.classes, CLASSES)
    assert (case.lib.amax(dim=(2, 3)) > 0.99).all()  # the maps are not degenerate
    torch.testing.assert_close(case.ref.heatmaps, case.lib, atol=LIB_ATOL, rtol=0)


def test_gradcam_matches_manual_split(case):
    # Grad-CAM by hand: d score / d A via autograd.grad on the hand-split model.
    a = case.feats.clone().requires_grad_(True)
    logits = case.head(a)
    manual = []
    for k in range(CLASSES.shape[1]):
        (g,) = torch.autograd.grad(
            logits.gather(1, CLASSES[:, k : k + 1]).sum(), a, retain_graph=True
        )
        manual.append(torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1)))
    manual = torch.stack(manual, 1).detach()
    assert manual.amax() > 0
    torch.testing.assert_close(case.ref.cams, manual, atol=1e-8, rtol=0)
    torch.testing.assert_close(case.ref.logits, logits.detach(), atol=1e-10, rtol=0)


def test_heatmaps_are_upsampled_minmax(case):
    up = F.interpolate(case.ref.cams, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    torch.testing.assert_close(case.ref.heatmaps, (up - lo) / (hi - lo), atol=1e-12, rtol=0)
    assert (case.ref.heatmaps.amin(dim=(2, 3)) == 0).all()
    assert (case.ref.heatmaps.amax(dim=(2, 3)) == 1).all()


def test_cam_matches_einsum(resnet_case, x):
    model = resnet_case.model
    ref = reference_cam(model, model.layer4, model.fc, x, CLASSES)
    w = model.fc.weight.detach()  # (N, C); CAM has no bias
    expected = torch.stack(
        [
            torch.einsum("kc,chw->khw", w[c], a)
            for a, c in zip(resnet_case.feats, CLASSES, strict=True)
        ]
    ).clamp_min(0)
    assert expected.amax() > 0
    torch.testing.assert_close(ref.cams, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(ref.logits, resnet_case.ref.logits, atol=1e-10, rtol=0)
    assert torch.equal(ref.classes, CLASSES)

    # GAP -> Linear: d score_c / d A[c', i, j] = W[c, c'] / (h*w), so Grad-CAM = CAM / (h*w) and
    # the normalised maps coincide, with ours and with pytorch-grad-cam's.
    torch.testing.assert_close(resnet_case.ref.cams * 9, ref.cams, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ref.heatmaps, resnet_case.lib, atol=LIB_ATOL, rtol=0)


def test_top1_default_under_no_grad_leaves_no_state(resnet_case, x):
    model = resnet_case.model
    with torch.no_grad():  # the reference must switch autograd on by itself
        res = HookGradCAM(model, model.layer4)(x)
    assert torch.equal(res.classes, resnet_case.ref.logits.argmax(1, keepdim=True))
    assert res.cams.shape == (2, 1, 3, 3) and res.heatmaps.shape == (2, 1, SIZE, SIZE)
    cam = reference_cam(model, model.layer4, model.fc, x)
    assert torch.equal(cam.classes, res.classes)
    torch.testing.assert_close(res.cams * 9, cam.cams, atol=1e-10, rtol=1e-10)

    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
        assert not m._forward_pre_hooks and not m._backward_pre_hooks
    assert not x.requires_grad and x.grad is None


class _TupleNet(nn.Module):
    """Train-mode GoogLeNet style: returns a namedtuple whose first field is the logits."""

    Out = namedtuple("Out", ["logits", "aux"])

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = self.act(self.conv(x))
        logits = self.fc(a.mean((2, 3)))
        return self.Out(logits, logits * 2)


def _tiny() -> tuple[_TupleNet, torch.Tensor]:
    torch.manual_seed(0)
    return _TupleNet().double(), torch.randn(3, 3, 8, 8, dtype=torch.float64)


def test_tuple_output_and_frozen_model():
    net, xx = _tiny()
    cam = reference_cam(net, net.act, net.fc, xx, [[0, 1]] * 3)
    grad = reference_gradcam(net, net.act, xx, [[0, 1]] * 3)
    torch.testing.assert_close(grad.logits, net(xx).logits.detach(), atol=0, rtol=0)
    torch.testing.assert_close(grad.cams * 64, cam.cams, atol=1e-12, rtol=1e-10)
    # A frozen model still yields a graph: the reference makes its own input require grad.
    net.requires_grad_(False)
    frozen = reference_gradcam(net, net.act, xx, [[0, 1]] * 3)
    torch.testing.assert_close(frozen.cams, grad.cams, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (2, [[2], [2], [2]]),
        ([0, 3, 1], [[0], [3], [1]]),
        (torch.tensor([[1, 0], [2, 2], [3, 1]]), [[1, 0], [2, 2], [3, 1]]),
    ],
)
def test_class_formats(classes, expected):
    net, xx = _tiny()
    for fn in (reference_gradcam, lambda *a: reference_cam(a[0], a[1], net.fc, *a[2:])):
        res = fn(net, net.act, xx, classes)
        assert res.classes.dtype == torch.long
        assert torch.equal(res.classes, torch.tensor(expected))
        assert res.cams.shape == (3, len(expected[0]), 8, 8)


def test_bad_classes_raise_and_leave_no_hooks():
    net, xx = _tiny()
    with pytest.raises(ValueError):
        reference_gradcam(net, net.act, xx, [0, 1])  # 2 rows for a batch of 3
    with pytest.raises(RuntimeError):
        reference_gradcam(net, net.act, xx, [0, 1, 99])  # class out of range, mid-call
    assert not net.act._forward_hooks and not net.act._backward_hooks
    assert all(p.grad is None for p in net.parameters())


def test_flat_map_is_zeros_not_nan():
    net, xx = _tiny()
    with torch.no_grad():
        net.conv.weight.zero_()
        net.conv.bias.fill_(-1.0)  # ReLU output is all zeros -> flat CAM
    for res in (
        reference_gradcam(net, net.act, xx, 0),
        reference_cam(net, net.act, net.fc, xx, 0),
    ):
        assert torch.equal(res.heatmaps, torch.zeros(3, 1, 8, 8, dtype=torch.float64))
