"""Grad-CAM export of general heads (the traced head gradient): ORT maps vs the PyTorch engine.

One tiny model per head kind that neither closed form covers: pool -> 1x1 conv -> act -> flatten
-> linear (timm MobileNetV3 / GhostNet / LCNet), timm VGG's ConvMlp pre-logits, a ViT class-token
head, Swin's channels-last norm -> pool, ResMLP's token mean; heads that take sizes (ints) from
the trunk besides tensors (Hugging Face ViT's ``torch.export`` split, timm PiT's FX split).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import images
from test_export import assert_matches_engine
from timm.layers import ClassifierHead, SelectAdaptivePool2d
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
from timm.models.swin_transformer import SwinTransformer
from timm.models.vgg import ConvMlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import cam_engine as ce
from cam_engine.export import OrtCAM, to_onnx
from cam_engine.export.graphs import Postprocess
from cam_engine.export.head_vjp import DECOMPOSITIONS, HeadGradCAM, MapLayout, trace_head_gradient
from cam_engine.layout import to_nchw

F32 = torch.float32
aten = torch.ops.aten


def _stem(channels: int = 12) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, channels, 3, stride=2, padding=1), nn.ReLU(),
    )  # fmt: skip


class ConvHeadNet(nn.Module):
    """timm MobileNetV3's head (pool -> 1x1 conv -> Hardswish -> flatten -> linear) after a
    strided 3x3 conv, so that the head's backward runs a transposed convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stem()
        self.tail = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        self.global_pool = SelectAdaptivePool2d(pool_type="avg")
        self.conv_head = nn.Conv2d(16, 24, 1)
        self.act = nn.Hardswish()
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(24, 10)

    def forward(self, x):
        x = self.conv_head(self.global_pool(self.tail(self.features(x))))
        return self.classifier(self.flatten(self.act(x)))


class ConvMlpNet(nn.Module):
    """timm VGG's head: ConvMlp (a map under 7x7 is adaptively pooled up to 7x7, then a 7x7
    conv) -> ClassifierHead."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stem()
        self.pre_logits = ConvMlp(12, 16, kernel_size=7, drop_rate=0.0)
        self.head = ClassifierHead(16, 10)

    def forward(self, x):
        return self.head(self.pre_logits(self.features(x)))


class CumMaxHead(nn.Module):
    """A head with a running maximum, an op with no ONNX form."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _stem()
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(2).cummax(-1).values.mean(-1))


def _seeded(build):
    torch.manual_seed(0)
    model = build().eval()
    for module in model.modules():  # timm zero-initialises some heads: no gradient at all
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.5)
    return model


def vit() -> nn.Module:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=10
    )


def swin() -> nn.Module:
    return SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(1,), num_heads=(2,), window_size=4,
        num_classes=10,
    )  # fmt: skip


def resmlp() -> nn.Module:
    return MlpMixer(
        num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=16,
        mlp_ratio=2, block_layer=ResBlock, norm_layer=Affine,
    )  # fmt: skip


def _export(model, tmp_path, layer, size, tol=1e-4, **settings):
    path = tmp_path / "model.onnx"
    result = to_onnx(model, path, layer, method="gradcam", topk=2, input_size=size, **settings)
    assert result.metadata["head"] == "head-vjp"
    assert result.metadata["exporter"] == "dynamo"
    assert max(result.errors.values()) < tol  # the self-check: batch 3 (and a second size)
    return OrtCAM(path)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("size", [7, 8])
def test_convolution_backward_decomposition_matches_autograd(stride, size):
    x = torch.randn(2, 4, size, size + 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    y = F.conv2d(x, weight, None, stride, 1, 2, groups=2)
    grad = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x, grad)
    decomposed = DECOMPOSITIONS[aten.convolution_backward.default]
    got, *_ = decomposed(
        grad, x, weight, None, [stride] * 2, [1, 1], [2, 2], False, [0, 0], 2, [True, False, False]
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv_head_any_size(tmp_path):
    model = _seeded(ConvHeadNet)
    ort_cam = _export(model, tmp_path, "features", (64, 48), dynamic_size=True)
    x = images(1, (44, 76), F32, seed=5)  # an odd 11x19 map
    assert_matches_engine(ort_cam, model, "gradcam", x)


def test_vgg_conv_mlp_head_fp16(tmp_path):
    model = _seeded(ConvMlpNet)
    # a 6x6 map: ConvMlp pools it up to 7x7 (overlapping bins, and their transpose backward);
    # float16 trunk, the traced head in float32 (the self-check compares with the float64 engine)
    ort_cam = _export(model, tmp_path, "features", (24, 24), tol=1e-2, fp16=True)
    assert ort_cam.metadata["fp16"]


def test_a_head_branching_on_the_map_size_is_refused_with_dynamic_size(tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match=r"branches on the map's size \(.* >= 7 \(map dim"):
        to_onnx(_seeded(ConvMlpNet), path, "features", method="gradcam", dynamic_size=True,
                input_size=(32, 32))  # fmt: skip
    assert not path.exists()


def test_vit_class_token_head_matches_pytorch_grad_cam(tmp_path):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _seeded(vit)
    ort_cam = _export(model, tmp_path, "blocks.0.norm1", (32, 32), upsample=False)
    x = images(2, 32, F32, seed=5)
    got = ort_cam(x)
    assert got.heatmaps.shape == (2, 2, 4, 4)  # the 4x4 patch grid, class token dropped

    def tokens_to_map(tokens):
        return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    with GradCAM(model, [model.blocks[0].norm1], reshape_transform=tokens_to_map) as cam:
        for k in range(2):
            targets = [ClassifierOutputTarget(int(c)) for c in got.classes[:, k]]
            cam(x, targets)  # its own maps are resized with OpenCV: compare the raw ones
            acts = cam.activations_and_grads.activations[0].double()  # already laid out
            grads = cam.activations_and_grads.gradients[0].double()
            raw = (grads.mean((2, 3), keepdim=True) * acts).sum(1).relu()
            lo = raw.flatten(1).amin(1)[:, None, None]
            want = (raw - lo) / (raw.flatten(1).amax(1)[:, None, None] - lo)
            np.testing.assert_allclose(got.heatmaps[:, k].double(), want, atol=1e-4)


def test_swin_channels_last_norm_head(tmp_path):
    model = _seeded(swin)
    ort_cam = _export(model, tmp_path, "layers.0", (32, 32))
    assert_matches_engine(ort_cam, model, "gradcam", images(4, 32, F32, seed=5))


def test_resmlp_token_mean_head_given_classes(tmp_path):
    model = _seeded(resmlp)
    ort_cam = _export(model, tmp_path, "blocks.1", (32, 32), classes_input=True)
    classes = torch.tensor([[3, 0], [9, 9], [1, 4], [7, 2]])  # Affine -> token mean -> linear
    assert_matches_engine(ort_cam, model, "gradcam", images(4, 32, F32, seed=5), classes)


def test_hugging_face_vit_head_taking_the_batch_size_as_an_int(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8, num_labels=10,
    )  # fmt: skip
    model64 = transformers.ViTForImageClassification(config).double().eval()
    model = copy.deepcopy(model64).float()
    path = tmp_path / "model.onnx"
    # the torch.export split's head reads the batch size from the trunk: an int, not a tensor
    # (topk=1 and no self-check: each explained class is one more backward in the export)
    to_onnx(model, path, None, method="gradcam", topk=1, output="logits", input_size=(32, 32),
            upsample=False, normalize=False, check=False)  # fmt: skip
    ort_cam = OrtCAM(path)
    layer = ort_cam.metadata["target_layer"]
    assert layer == "vit.layers.0.layernorm_before"
    engine = ce.CAMEngine(model64, layer, "gradcam", output="logits", input_size=(32, 32))
    for batch in (1, 3):  # neither is the batch of 2 the export traces with
        x = images(batch, 32, F32, seed=batch)
        got = ort_cam(x)  # raw maps: no upsampling or normalisation
        want = engine(x.double(), got.classes)
        assert torch.equal(got.classes, want.logits.argmax(1, keepdim=True))
        torch.testing.assert_close(got.logits.double(), want.logits, rtol=1e-5, atol=1e-6)
        scale = want.cams.abs().max().item()
        assert scale > 0, "all-zero maps would make the comparison vacuous"
        torch.testing.assert_close(got.heatmaps.double(), want.cams, rtol=0, atol=1e-5 * scale)


class SizesAcrossTheCut(nn.Module):
    """timm PiT's pattern under torch.fx: the trunk reads B, C, H, W and the class tokens'
    count (a constant 1) as ints, and the head after the tokens lays them out by those ints."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
        self.norm = nn.LayerNorm(6)
        self.pool = nn.Conv2d(6, 6, 2, stride=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        batch, channels, height, width = x.shape
        cls = self.cls_token.expand(batch, -1, -1)
        count = cls.shape[1]
        tokens = self.norm(torch.cat([cls, x.flatten(2).transpose(1, 2)], 1))
        cls, grid = tokens[:, :count], tokens[:, count:]
        grid = grid.transpose(1, 2).reshape(batch, channels, height, width)
        pooled = self.pool(grid).amax((2, 3))
        return self.fc(torch.cat([cls[:, 0], pooled], 1))


def test_sizes_the_head_takes_from_the_trunk_follow_the_input_in_its_traced_gradient():
    torch.manual_seed(0)
    model = SizesAcrossTheCut().double().eval()
    cam_model = ce.CAMModel(model, "norm", input_size=(16, 24))
    _, *extras = cam_model.current().split.trunk(images(2, (16, 24)))
    assert [type(e) for e in extras[:5]] == [int] * 5  # batch, channels, height, width, count
    post = Postprocess(upsample=False, normalize=False)
    graph = HeadGradCAM(cam_model, 2, post, images(2, (16, 24)), False, dynamic_size=True)
    engine = ce.CAMEngine(model, "norm", "gradcam", input_size=(16, 24))
    for batch, size in [(3, (24, 16)), (1, (32, 32))]:  # other ints: other batches and grids
        x = images(batch, size)
        logits, classes, cams = graph(x)
        want = engine(x, classes)
        torch.testing.assert_close(logits.double(), want.logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(classes, want.logits.topk(2, dim=1).indices)
        scale = want.cams.abs().max().item()
        assert scale > 0, "all-zero maps would make the comparison vacuous"
        torch.testing.assert_close(cams.double(), want.cams, rtol=0, atol=1e-5 * scale)


def test_op_without_onnx_form_is_refused_by_name(tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match=r"uses aten\.cummax, which has no ONNX form"):
        to_onnx(_seeded(CumMaxHead), path, "features", method="gradcam", input_size=(32, 32))
    assert not path.exists()


class LargeActivations(nn.Module):
    """A GAP -> linear net whose maps are differences of two activations near 1e4: float32
    rounds each activation by ~1e-3, a visible part of maps of size ~1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.features.bias.fill_(1e4)
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, -2.0]]))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_tolerance_follows_the_float32_rounding_of_large_activations(tmp_path):
    torch.manual_seed(0)
    result = to_onnx(LargeActivations().eval(), tmp_path / "m.onnx", topk=2, input_size=(16, 16))
    heatmaps = [error for name, error in result.errors.items() if name.startswith("heatmaps")]
    assert 1e-4 < max(heatmaps) < 1e-2  # above the fixed tolerance, at float32's own level


def test_map_layouts_follow_the_engines_inference():
    tokens = torch.randn(2, 1 + 4 * 6, 5)  # a class token and a 4x6 grid of a 32x48 image
    layout = MapLayout.infer(tokens, (32, 48))
    assert layout == MapLayout("tokens", 1, (8, 8))
    other = torch.randn(2, 1 + 3 * 7, 5)  # 24x56: the grid follows the image in the graph
    torch.testing.assert_close(layout.apply(other, torch.zeros(2, 3, 24, 56)),
                               to_nchw(other, None, (24, 56)))  # fmt: skip
    assert MapLayout.infer(torch.randn(2, 4, 6, 16), (32, 48)).kind == "nhwc"
    assert MapLayout.infer(torch.randn(2, 16, 4, 6), (32, 48)).kind == "nchw"


def test_traced_head_gradient_holds_at_other_batch_and_map_sizes():
    torch.manual_seed(0)
    head = nn.Sequential(
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(1), nn.Linear(4 * 6, 7)
    ).double()
    graph = trace_head_gradient(head, torch.randn(2, 4, 8, 10).double(), (), None, 3, False)
    for shape in [(3, 4, 9, 13), (1, 4, 16, 6)]:
        features = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        logits, classes, grads = graph(features.detach())
        want = head(features)
        torch.testing.assert_close(logits, want.detach())
        assert torch.equal(classes, want.topk(3, dim=1).indices)
        for k in range(3):
            (grad,) = torch.autograd.grad(want.gather(1, classes[:, k : k + 1]).sum(), features,
                                          retain_graph=True)  # fmt: skip
            torch.testing.assert_close(grads[:, k], grad)
