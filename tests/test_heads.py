"""The head recogniser (:mod:`cam_engine.heads`) on the global-average-pool -> linear heads of
timm, torchvision and Hugging Face models: channels-last pooling, permutes before pooling,
``torch.export`` graphs, timm's ``ClassifierHead`` and 1x1-conv classifiers.

On such a head dScore/dA is ``W[c] / (h*w)`` at every position, so for each head the closed
form (``method="cam"``, no backward) must equal the classic CAM written out here (an einsum of the
FC rows with a forward-hook capture of the map), the engine's own autograd path and, after
normalisation, pytorch-grad-cam's Grad-CAM at the same layer. Tiny float64 models.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import images
from test_export import assert_matches_engine
from test_parity import CAM_TOL, HEATMAP_TOL, capture, pgc_gradcam, upsample_minmax
from timm.layers import ClassifierHead
from torch import Tensor, nn
from torch.testing import assert_close
from torchvision.ops.misc import Permute

import cam_engine as ce
from cam_engine.bench.models import LogitsOnly
from cam_engine.export import OrtCAM, to_onnx
from cam_engine.heads import pair

F32 = torch.float32


def _nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


class _Stem(nn.Module):
    """3 -> 16 channels at a quarter of the input's size; ``channels_last`` outputs NHWC."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()
        )
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        x = self.convs(x)
        return x.permute(0, 2, 3, 1) if self.channels_last else x


class NHWCPoolNet(nn.Module):
    """timm's Swin / SwinV2 / Sequencer head: an NHWC ``norm``, then ``ClassifierHead`` with
    ``input_fmt="NHWC"`` (a mean over dims (1, 2)) and ``Linear -> Identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _Stem(channels_last=True)
        self.norm = nn.LayerNorm(16)
        self.head = ClassifierHead(16, 5, input_fmt="NHWC")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.stem(x)))


class PermutePoolNet(nn.Module):
    """torchvision ``swin_t``'s head after its NHWC ``norm``: ``Permute([0, 3, 1, 2])`` ->
    ``AdaptiveAvgPool2d`` -> flatten -> linear; ``method=True`` permutes with
    ``Tensor.permute`` as timm's NesT does."""

    def __init__(self, method: bool = False) -> None:
        super().__init__()
        self.stem = _Stem(channels_last=True)
        self.norm = nn.LayerNorm(16)
        self.permute = None if method else Permute([0, 3, 1, 2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.stem(x))
        x = x.permute(0, 3, 1, 2) if self.permute is None else self.permute(x)
        return self.fc(self.flatten(self.avgpool(x)))


class TimmHeadNet(nn.Module):
    """A conv trunk and timm's ``ClassifierHead`` (pool -> dropout -> Linear -> Identity, or
    pool -> dropout -> 1x1 conv -> flatten with ``use_conv``): regnet, repvgg, rexnet, ..."""

    def __init__(self, use_conv: bool = False) -> None:
        super().__init__()
        self.stem = _Stem()
        self.head = ClassifierHead(16, 5, use_conv=use_conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stem(x))


class AtenHeadNet(nn.Module):
    """The head ``torch.export`` gives HF MobileViT: ``aten.mean.dim`` over (-2, -1) ->
    ``aten.dropout_`` (inactive) -> ``aten.linear``, here traced by torch.fx (no export's cost)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _Stem()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        aten = torch.ops.aten
        x = aten.dropout_.default(aten.mean.dim(self.stem(x), [-2, -1]), 0.1, False)
        return aten.linear.default(x, self.fc.weight, self.fc.bias)


def _seeded(cls, *args, dtype=torch.float64):
    torch.manual_seed(0)
    return cls(*args).to(dtype).eval()


def _fc_rows(model: nn.Module) -> Tensor:
    """(N, C) rows of the head's linear map (a Linear, or a 1x1 conv's kernel)."""
    fc = next(m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear | nn.Conv2d))
    return fc.weight.detach().flatten(1)


def assert_cam_is_closed_form(model, layer, x, nchw=lambda t: t, transform=None):
    """CAM at ``layer`` == the FC rows times the hooked map (B, C, h, w after ``nchw``), the
    autograd path, and pytorch-grad-cam's Grad-CAM once normalised."""
    engine = ce.CAMEngine(model, layer, "cam")
    assert engine.model.gap_linear is not None
    res = engine(x, ce.TopK(2))
    logits, features = capture(model, layer, x)
    features = nchw(features)
    rows = _fc_rows(model)[logits.topk(2).indices]
    expected = torch.einsum("bkc,bchw->bkhw", rows, features).relu()
    assert_close(res.cams, expected, atol=CAM_TOL, rtol=0)
    assert_close(res.heatmaps, upsample_minmax(expected, x.shape[2:]), atol=CAM_TOL, rtol=0)
    slow = ce.CAMEngine(model, layer, "cam", closed_form=False)(x, ce.TopK(2))
    assert_close(res.cams, slow.cams, atol=CAM_TOL, rtol=0)
    heat, _ = pgc_gradcam(model, layer, x, res.classes[:, 0], reshape_transform=transform)
    assert_close(res.heatmaps[:, 0], heat, atol=HEATMAP_TOL, rtol=0)
    return res


# --- hand-written heads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "args", "nchw"),
    [
        (NHWCPoolNet, (), _nhwc),
        (PermutePoolNet, (), _nhwc),
        (PermutePoolNet, (True,), _nhwc),
        (TimmHeadNet, (), None),
        (TimmHeadNet, (True,), None),
        (AtenHeadNet, (), None),
    ],
    ids=[
        "nhwc-mean",
        "permute-module",
        "permute-method",
        "timm-linear-identity",
        "timm-conv",
        "aten-mean-dropout-linear",
    ],
)
def test_cam_on_gap_linear_heads(cls, args, nchw):
    # an 8x12 map of 16 channels: (B, 8, 12, 16) fits the image's aspect read either way
    model, x = _seeded(cls, *args), images(2, (32, 48))
    layer = "norm" if nchw else "stem"
    assert_cam_is_closed_form(model, layer, x, nchw or (lambda t: t), nchw)


def test_pair_reads_torch_size_arguments_per_dimension():
    # nn.AvgPool2d(3).kernel_size is 3, nn.AdaptiveAvgPool2d((1, None)).output_size a tuple
    assert pair(nn.AvgPool2d(3).kernel_size) == (3, 3)
    assert pair(nn.AdaptiveAvgPool2d((1, None)).output_size) == (1, None)
    assert pair([2, 4]) == (2, 4)


def test_channels_last_gradients_are_in_the_layers_layout():
    """The closed-form dScore/dA is laid out as the map (B, h, w, C), as autograd's is."""
    model, x = _seeded(NHWCPoolNet), images(2, (32, 48))
    cam_model = ce.CAMModel(model, "norm", input_size=(32, 48))
    gap = cam_model.gap_linear
    logits, features = cam_model(x)
    classes = logits.topk(2).indices
    features = features.detach().requires_grad_(True)
    by_autograd = torch.stack(
        [torch.autograd.grad(model.head(features).gather(1, classes[:, k : k + 1]).sum(),
                             features)[0] for k in range(2)],
        1,
    )  # fmt: skip
    assert features.shape == (2, 8, 12, 16)
    assert_close(gap.gradients(classes, features), by_autograd, atol=1e-15, rtol=0)


class _SwappedPermuteNet(PermutePoolNet):
    """A permute that does not bring the channels first: the pool then averages channels (a
    16x16 map of 16 channels at 64x64)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.stem(x)).permute(0, 1, 3, 2)
        return self.fc(self.flatten(self.avgpool(x)))


class _PoolMLPNet(TimmHeadNet):
    """pool -> flatten -> linear -> ReLU -> linear: not linear in the map."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5)
        )


@pytest.mark.parametrize(
    ("cls", "layer", "why"),
    [
        (_SwappedPermuteNet, "norm", r"'permute' .* permutes to \(0, 1, 3, 2\), not channels-last"),
        (_PoolMLPNet, "stem", r"ReLU module 'head.3' \(activation\) where the form allows none"),
    ],
    ids=["permute", "mlp"],
)
def test_heads_that_are_not_gap_linear_are_refused_with_the_op(cls, layer, why, tmp_path):
    model = _seeded(cls)
    with pytest.raises(
        ValueError, match="global average pooling.*this model's is not: .*" + why
    ) as engine_error:
        ce.CAMEngine(model, layer, "cam", input_size=(64, 64))
    assert ce.CAMEngine(model, layer, input_size=(64, 64))(images(2, 64)).cams.shape[0] == 2
    with pytest.raises(ValueError) as export_error:  # the export says the same
        to_onnx(model.float(), tmp_path / "m.onnx", layer, method="cam", input_size=(64, 64))
    assert str(export_error.value) == str(engine_error.value)


# --- timm Swin and a Hugging Face ResNet (torch.export split) -----------------------------------


def test_timm_swin_cam_at_its_norm():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16,
        depths=(1, 1), num_heads=(1, 2), num_classes=5,
    ).double().eval()  # fmt: skip
    res = assert_cam_is_closed_form(model, "norm", images(2, 32), _nhwc, _nhwc)
    assert res.cams.shape == (2, 2, 4, 4)


def test_hf_resnet_cam_through_torch_export():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    hf = ResNetForImageClassification(config).double().eval()
    x = images(2, 32)
    engine = ce.CAMEngine(hf, "resnet.encoder.stages.1", "cam", input_size=(32, 32))
    assert engine.model.split_kind == "export" and engine.model.gap_linear is not None
    res = engine(x, ce.TopK(2))
    logits, features = capture(hf, "resnet.encoder.stages.1", x)
    rows = hf.classifier[1].weight.detach()[logits.logits.topk(2).indices]
    expected = torch.einsum("bkc,bchw->bkhw", rows, features).relu()
    assert_close(res.cams, expected, atol=CAM_TOL, rtol=0)
    wrapped = LogitsOnly(hf)
    heat, _ = pgc_gradcam(wrapped, "model.resnet.encoder.stages.1", x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], heat, atol=HEATMAP_TOL, rtol=0)


# --- export: the same heads, CAM in closed form inside the graph --------------------------------


@pytest.mark.parametrize(
    ("cls", "args", "layer"),
    [(NHWCPoolNet, (), "norm"), (PermutePoolNet, (), "norm"), (TimmHeadNet, (True,), "stem")],
    ids=["nhwc-mean", "permute-module", "timm-conv"],
)
def test_export_cam_of_gap_linear_heads(cls, args, layer, tmp_path):
    model = _seeded(cls, *args, dtype=F32)
    path = tmp_path / "m.onnx"
    result = to_onnx(model, path, layer, method="cam", topk=2, input_size=(32, 48))
    assert result.metadata["head"] == "gap-linear" and max(result.errors.values()) < 1e-4
    assert_matches_engine(OrtCAM(path), model, "cam", images(3, (32, 48), F32))
