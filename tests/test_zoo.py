"""timm and Hugging Face models: default layers, splits and module targets, one tiny model per
head kind, each against pytorch-grad-cam at the same layer (float64, random weights).

The full zoo (the smallest variant of every family) is ``scripts/check_zoo.py``.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from conftest import calibrate_bn, images
from test_methods import pgc_raw
from torch import Tensor, nn
from torch.testing import assert_close

import cam_engine as ce
from cam_engine.bench.models import LogitsOnly

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("pytorch_grad_cam")


def tokens_to_nchw(tokens: Tensor, prefix: int = 1) -> Tensor:
    """pytorch-grad-cam's ViT reshape_transform: (B, prefix + h*w, C) -> (B, C, h, w)."""
    grid = tokens[:, prefix:]
    side = int(grid.shape[1] ** 0.5)
    return grid.reshape(grid.shape[0], side, side, -1).permute(0, 3, 1, 2)


def assert_matches_pgc(model, engine, layer, x, transform=None):
    """Grad-CAM cams of ``engine`` equal pytorch-grad-cam's at module ``layer`` (1e-5)."""
    res = engine(x)
    classes = res.classes[:, 0]
    expected = pgc_raw("gradcam", model, layer, x, classes, transform).relu()
    assert expected.amax() > 0, "an all-zero map would make the comparison vacuous"
    assert_close(res.cams[:, 0], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@functools.cache
def timm_vit() -> nn.Module:
    """timm ViT, 2 blocks on 32 px: 4x4 patches and a class token."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
    )
    return model.double().eval()


@functools.cache
def hf_vit() -> nn.Module:
    """Hugging Face ViTForImageClassification from a 2-layer config on 32 px."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return transformers.ViTForImageClassification(config).double().eval()


def test_timm_vit_default_is_the_last_blocks_norm1_and_matches_pytorch_grad_cam():
    model = timm_vit()
    engine = ce.CAMEngine(model, None, "gradcam", input_size=(32, 32))
    assert engine.target_layer == "blocks.1.norm1"  # not a node inside attention
    x = images(2, 32)
    assert engine(x).cams.shape == (2, 1, 4, 4)
    assert_matches_pgc(model, engine, "blocks.1.norm1", x, tokens_to_nchw)


def test_module_objects_are_named_by_identity():
    model = timm_vit()
    engine = ce.CAMEngine(model, model.blocks[-1].norm1, "gradcam", input_size=(32, 32))
    assert engine.target_layer == "blocks.1.norm1"
    layers = ce.CAMEngine(model, [model.blocks[0], model.blocks[1].norm1], input_size=(32, 32))
    assert layers.target_layer == ["blocks.0", "blocks.1.norm1"]
    wrapped = ce.wrap(model, model.norm, input_size=(32, 32))
    assert wrapped.target_layer == "norm"
    assert ce.CAMEngine(wrapped, model.norm).target_layer == "norm"
    with pytest.raises(ValueError, match="not a module of this model") as info:
        ce.CAMEngine(model, nn.LayerNorm(32), input_size=(32, 32))
    assert len(str(info.value)) < 120  # no module printout
    with pytest.raises(ValueError, match="a name or a module"):
        ce.CAMEngine(model, 3, input_size=(32, 32))


def test_timm_cnn_module_target_matches_pytorch_grad_cam():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).double().eval()
    engine = ce.CAMEngine(model, model.layer3, "gradcam")
    assert (engine.target_layer, engine.split_kind) == ("layer3", "fx")
    assert ce.CAMEngine(model, None).target_layer == "layer4"
    assert_matches_pgc(model, engine, "layer3", images(2, 64))


def test_hf_vit_keeps_its_output_keys_and_matches_pytorch_grad_cam():
    model = hf_vit()
    engine = ce.CAMEngine(model, None, "gradcam", output="logits", input_size=(32, 32))
    layer = "vit.layers.1.layernorm_before"
    assert engine.target_layer == layer
    x = images(2, 32)
    with torch.no_grad():
        assert_close(engine.cam_model.predict(x), model(x).logits)
    assert_matches_pgc(LogitsOnly(model), engine, f"model.{layer}", x, tokens_to_nchw)


def test_hf_resnet_default_is_the_last_stage_and_matches_pytorch_grad_cam():
    """The encoder returns a ``ModelOutput`` (pytorch-grad-cam cannot hook it) holding the same
    tensor as its last stage: the default is named by the stage, which returns the tensor."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        num_labels=10, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]
    )  # two stages: a 4x4 map at 32 px
    hf = transformers.ResNetForImageClassification(config).double()
    model = calibrate_bn(hf, images(4, 32))
    engine = ce.CAMEngine(model, None, "gradcam", output="logits", input_size=(32, 32))
    layer = "resnet.encoder.stages.1"
    assert (engine.target_layer, engine.split_kind) == (layer, "export")
    assert_matches_pgc(LogitsOnly(model), engine, f"model.{layer}", images(2, 32))


def small_levit(size: int = 64) -> nn.Module:
    """timm LeViT with one 1-block stage on ``size`` px (4x4 tokens at 64 px); its attention
    memoises its biases in ``attention_bias_cache`` on the first eval forward."""
    torch.manual_seed(0)
    model = timm.models.levit.Levit(
        img_size=size, num_classes=10, embed_dim=(32,), key_dim=8, depth=(1,), num_heads=(2,)
    )
    return model.double().eval()


def test_levit_second_engine_and_model_untouched_by_tracing():
    model = small_levit()
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    assert caches
    x = images(2, 64)
    first = ce.CAMEngine(model, None, "gradcam", input_size=(64, 64))
    assert all(cache == {} for cache in caches)  # no proxy or fake tensor left behind
    second = ce.CAMEngine(model, first.target_layer, "gradcam", input_size=(64, 64))
    assert_close(first(x).cams, second(x).cams)
    with torch.no_grad():
        expected = model(x)  # fills the cache with real tensors
    third = ce.CAMEngine(model, None, "gradcam", input_size=(64, 64))
    with torch.no_grad():
        assert_close(third.cam_model.predict(x), expected)
        assert_close(model(x), expected)
    assert first.target_layer == "stages"  # the last stage's tokens (B, 16, C)
    assert first(x).cams.shape == (2, 1, 4, 4)


class ShapePropBreaks(nn.Module):
    """A model whose FX graph is wrong (it takes a branch only while FX traces) while
    ``torch.export`` traces it right: the FX split must give way to the export one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv(x)
        if isinstance(a, torch.fx.Proxy):  # torch.fx's symbolic tracing only
            a = a.view(-1, 7)  # what FX records fails on every input
        return self.fc(a.mean((2, 3)))


def test_a_failing_fx_split_falls_through_to_export():
    model = ShapePropBreaks().double().eval()
    engine = ce.CAMEngine(model, None, "gradcam", input_size=(8, 8))
    assert (engine.split_kind, engine.target_layer) == ("export", "conv")
    assert any(note.startswith("fx split") for note in engine.cam_model.notes)
    x = images(2, 8)
    res = engine(x)
    a = model.conv(x)
    score = model.fc(a.mean((2, 3))).gather(1, res.classes).sum()
    (grad,) = torch.autograd.grad(score, a)
    expected = (grad.mean((2, 3), keepdim=True) * a).sum(1).relu()
    assert_close(res.cams[:, 0], expected.detach())


class Strip(nn.Module):
    """Lays a (B, C, 8, 8) map out as (B, C, 2, 32): no grid of the image's aspect."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], 2, 32)


def test_a_map_whose_grid_misfits_the_image_warns():
    layers = [nn.Conv2d(3, 4, 3, padding=1), Strip(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(*layers, nn.Linear(4, 3)).double().eval()
    x = images(2, 8)
    with pytest.warns(UserWarning, match="aspect ratio"):
        ce.CAMEngine(model, "1", input_size=(8, 8))(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce.CAMEngine(model, "0", input_size=(8, 8))(x)
        assert ce.CAMEngine(model, None, input_size=(8, 8)).target_layer == "0"
        ce.CAMEngine(model, "2", input_size=(8, 8))(x)  # a 1x1 map: nothing is stretched


@pytest.mark.parametrize(
    ("shape", "fits"),
    [
        ((2, 17, 192), True),  # ViT tokens: a class token and 4x4 patches
        ((2, 17, 64), True),  # the same, though 64 channels would make an 8x8 grid
        ((2, 64, 32), True),  # 8x8 tokens, 32 channels
        ((2, 32, 64), False),  # the same transposed for a 1-D pooling (HF Swin / FocalNet)
        ((2, 3, 17, 64), False),  # (B, heads, T, d) inside attention
        ((2, 8, 2, 2), True),
        ((2, 2, 2, 8), True),  # channels last
    ],
)
def test_which_maps_fit_a_64_px_image(shape, fits):
    assert ce.layers.map_fits(shape, (64, 64)) is fits


def test_to_onnx_on_a_model_whose_cache_holds_autograd_values_leaves_it_untouched(tmp_path):
    """timm LeViT's first forward with autograd memoises a non-leaf tensor (its attention
    biases gathered from a parameter), which ``copy.deepcopy`` refuses: the export's converted
    copies must leave such memos out (and recompute them), and the user's stay as they were."""
    model = small_levit(32).float()
    x = images(2, 32).float()
    expected = model(x)  # with autograd on
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    memo = [dict(cache) for cache in caches]
    values = [value for cache in memo for value in cache.values()]
    assert values and not any(value.is_leaf for value in values)
    path = tmp_path / "levit.onnx"
    result = ce.export.to_onnx(  # one batch size: a dynamic one costs export time only
        model, path, method="gradcam", input_size=(32, 32), dynamic_batch=False,
        upsample=False, normalize=False,
    )  # fmt: skip
    assert result.metadata["head"] == "head-vjp" and result.errors  # self-checked in ORT
    assert all(  # the same tensors, neither copies nor recomputed ones
        cache.keys() == kept.keys() and all(cache[k] is kept[k] for k in kept)
        for cache, kept in zip(caches, memo, strict=True)
    )
    with torch.no_grad():
        assert_close(model(x), expected.detach())
    res = ce.export.OrtCAM(path)(x[:1])  # the file's raw maps against pytorch-grad-cam's
    transform = functools.partial(tokens_to_nchw, prefix=0)  # 2x2 tokens, no class token
    twin = small_levit(32).float()  # the same weights, its own memo
    expected = pgc_raw("gradcam", twin, "stages", x[:1], res.classes[:, 0], transform).relu()
    assert expected.amax() > 0
    assert_close(res.heatmaps[:, 0].double(), expected, rtol=0, atol=1e-5 * expected.max().item())


class Cancelling(nn.Module):
    """Conv -> ReLU -> pool -> MLP whose two layers cancel: ``fc2 fc1`` is O(1) while its
    hidden units are ~1e3, so float32 logits carry ~5e-5 of rounding (HF LeViT at 224 px: 10%)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(4, 64)
        self.fc2 = nn.Linear(64, 5)
        generator = torch.Generator().manual_seed(0)
        block = torch.rand(32, 4, generator=generator) * 1e3
        rows = torch.randn(5, 32, generator=generator)
        small = torch.randn(5, 32, generator=generator) / 1e3
        with torch.no_grad():
            self.fc1.weight.copy_(torch.cat([block, block]))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.cat([rows, small - rows], 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(self.pool(self.act(self.conv(x))).flatten(1)).relu())


def test_to_onnx_logits_are_checked_against_the_rounding_of_the_model_itself(tmp_path):
    """The file's float32 logits may differ from the float64 engine by up to 4x what the
    float32 PyTorch model does (as its maps may): float32 cannot round better."""
    torch.manual_seed(0)
    model = Cancelling().eval()
    x = images(3, 16, seed=1).float()  # the self-check's first batch
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        own = (model(x).double() - exact).abs().max() / exact.abs().max().clamp_min(1)
    assert own > 1e-5  # the model's own float32 error: a file may not be held to 1e-4 alone
    path = tmp_path / "m.onnx"
    result = ce.export.to_onnx(model, path, "act", method="gradcam", input_size=(16, 16))
    assert result.metadata["head"] == "pool-mlp"
    logits = next(v for k, v in result.errors.items() if k.startswith("logits"))
    assert 1e-4 < logits <= 4 * own
