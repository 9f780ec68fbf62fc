"""Issue #16's peer cases: defects found against the peers (pytorch-grad-cam 1.5.7, torchcam 0.5)
and the small capabilities they have, each checked against an independent reference (float64,
CPU, tiny models)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import images
from test_methods import HEATMAP_TOL, minmax
from test_methods_extra import torchcam_cams
from test_methods_peer import small_vit
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close
from torchvision.models.vision_transformer import EncoderBlock

import cam_engine as ce

tc = pytest.importorskip("torchcam.methods")


def _vit_shapley_reference(model, layer: str, x: Tensor, cls: int) -> Tensor:
    """ShapleyCAM by its definition on the whole model: ``w = mean over patches of g - H A / 2``
    at the layer's tokens (a leaf swapped in by a hook), the map on the patch grid (B, h, w)."""
    leaf = {}

    def swap(_module, _inputs, out):
        leaf["a"] = out.detach().requires_grad_()
        return leaf["a"]

    handle = model.get_submodule(layer).register_forward_hook(swap)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            score = model(x)[:, cls].sum()
    finally:
        handle.remove()
    a = leaf["a"]
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    (hvp,) = torch.autograd.grad(g, a, grad_outputs=a.detach())
    weights = (g - 0.5 * hvp)[:, 1:].mean(1)  # (B, C), the class token dropped
    maps = (a[:, 1:] * weights[:, None]).sum(-1).relu().detach()
    side = int(maps.shape[1] ** 0.5)
    return maps.view(-1, side, side)


def test_shapleycam_on_a_vit_on_the_cpu():
    """The double backward goes through attention: the fused CPU kernel has none (it failed with
    'derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward')."""
    model, x = small_vit(), images(2, 32)
    layer = "encoder.layers.encoder_layer_2.ln_1"
    res = ce.CAMEngine(model, layer, "shapleycam", input_size=(32, 32))(x, 3)
    expected = _vit_shapley_reference(model, layer, x, 3)
    assert_close(minmax(res.cams[:, 0]), minmax(expected), atol=HEATMAP_TOL, rtol=0)
    gradcam = ce.CAMEngine(model, layer, "gradcam", input_size=(32, 32))(x, 3)
    assert not torch.allclose(gradcam.cams, res.cams, atol=1e-3)  # the LayerNorm's H A matters


def test_sscam_does_not_depend_on_batch_size(resnet18):
    """The mask noise was drawn per chunk of ``batch_size`` masks: the chunks' draws are not one
    draw's numbers when a mask has a size randn does not vectorise (81 pixels: 3e-4 apart)."""
    x = images(2, 9)

    def run(batch_size: int) -> Tensor:
        options = {"num_samples": 2, "generator": torch.Generator().manual_seed(4)}
        engine = ce.CAMEngine(
            resnet18, "layer1", "sscam", batch_size=batch_size, method_options=options
        )
        return engine(x, [4, 2]).cams

    assert_close(run(5), run(256), atol=1e-12, rtol=0)


class TwoPrefixViT(nn.Module):
    """A ViT with two prefix tokens (class, distillation) on 16x32 images (a 2x4 patch grid),
    its blocks in ``container``: 10 tokens, which the engine's layout lays out as (2, 5)."""

    def __init__(self, container: type[nn.Module] = nn.Sequential, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 32, 8, stride=8)
        self.prefix = nn.Parameter(torch.randn(1, 2, 32) * 0.5)
        layers = [EncoderBlock(2, 32, 64, 0.0, 0.0) for _ in range(blocks)]
        self.blocks = (
            nn.Sequential(*layers) if container is nn.Sequential else nn.ModuleList(layers)
        )
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 10)

    def project(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(tokens.mean(1)))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], 1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))


@functools.cache
def two_prefix_vit(container: type[nn.Module]) -> nn.Module:
    return TwoPrefixViT(container).double().eval()


@pytest.mark.parametrize("container", [nn.Sequential, nn.ModuleList])
def test_legrad_with_two_prefix_tokens_and_a_module_list(container):
    """The grid was taken from the target map before the prefix was dropped ('8 tokens less
    prefix_tokens=2 do not fill the target layer's grid'); blocks in an nn.ModuleList were
    refused."""
    model, x = two_prefix_vit(container), images(2, (16, 32))
    options = {"prefix_tokens": 2, "projection": model.project}
    engine = ce.CAMEngine(model, "blocks.0", "legrad", input_size=(16, 32), method_options=options)
    res = engine(x, [3, 5])
    assert res.cams.shape == (2, 1, 2, 4)
    expected = torchcam_cams(
        tc.LeGrad,
        model,
        ["blocks.0", "blocks.1"],
        x,
        [3, 5],
        score_projection=model.project,
        prefix_tokens=2,
        grid_shape=(2, 4),
    )
    assert expected.amax() > 0
    assert_close(res.cams[:, 0], expected, atol=1e-10 * expected.amax(), rtol=1e-7)


class _DropsAToken(nn.Module):
    """A torchvision encoder block whose residual stream loses its first token."""

    def __init__(self, block: EncoderBlock) -> None:
        super().__init__()
        self.ln_1, self.self_attention = block.ln_1, block.self_attention
        self.ln_2, self.mlp = block.ln_2, block.mlp

    def forward(self, tokens: Tensor) -> Tensor:
        query = self.ln_1(tokens)
        attended, _ = self.self_attention(query, query, query, need_weights=False)
        tokens = (tokens + attended)[:, 1:]
        return tokens + self.mlp(self.ln_2(tokens))


def test_legrad_bad_blocks_and_projections_are_value_errors():
    """They were an IndexError (a projection to (B,)) and a RuntimeError (a block dropping a
    token)."""
    model, x = TwoPrefixViT().double().eval(), images(1, (16, 32))

    def run(model: nn.Module, projection) -> None:
        options = {"prefix_tokens": 2, "projection": projection}
        size = (16, 32)
        ce.CAMEngine(model, "blocks.0", "legrad", input_size=size, method_options=options)(x, 3)

    with pytest.raises(ValueError, match=r"must return logits \(B, N\), got \(1,\)"):
        run(model, lambda tokens: model.project(tokens)[:, 0])
    dropping = TwoPrefixViT().double().eval()  # a new model: the traced graph is kept per model
    dropping.blocks[0] = _DropsAToken(dropping.blocks[0])
    with pytest.raises(ValueError, match="keep their tokens"):
        run(dropping, dropping.project)


def test_rest_score_matches_pytorch_grad_cam(resnet18):
    """``ClassifierOutputReST``: the logit minus the cross-entropy, here with Grad-CAM."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST

    logits = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    scores = ce.targets.ReSTScore([2]).resolve(logits).scores(logits, torch.arange(1))
    expected = logits[0, 2] - torch.nn.functional.cross_entropy(logits, torch.tensor([2]))
    assert_close(scores, expected.view(1, 1), atol=1e-12, rtol=0)

    x = images(2, 64)
    res = ce.CAMEngine(resnet18, "layer4", "gradcam")(x, ce.targets.ReSTScore([3, 8]))
    with pgc.GradCAM(resnet18, [resnet18.layer4]) as cam:
        heat = cam(x, [ClassifierOutputReST(3), ClassifierOutputReST(8)])
    resnet18.zero_grad(set_to_none=True)
    expected = minmax(torch.from_numpy(heat).double())
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
    plain = ce.CAMEngine(resnet18, "layer4", "gradcam")(x, [3, 8])
    assert not torch.allclose(plain.heatmaps, res.heatmaps, atol=1e-3)


def test_randomcam_is_random_channel_weights(resnet18):
    """pytorch-grad-cam's ``RandomCAM`` (numpy's RNG: its numbers cannot be matched): uniform
    weights in [-1, 1] over the target map, reproducible with a generator."""
    x = images(2, 64)
    options = {"generator": torch.Generator().manual_seed(3)}
    res = ce.CAMEngine(resnet18, "layer4", "randomcam", method_options=options)(x, ce.TopK(2))
    weights = torch.rand((2, 2, 512), generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    with torch.no_grad():
        a = torch.nn.Sequential(*list(resnet18.children())[:-2])(x)
    expected = torch.einsum("bkc,bchw->bkhw", 2 * weights - 1, a).relu()
    assert_close(res.cams, expected, atol=1e-10, rtol=0)
    again = ce.CAMEngine(resnet18, "layer4", "randomcam", method_options=options)(x, ce.TopK(2))
    assert not torch.equal(again.cams, res.cams)  # the generator moved on


def test_fullgrad_eigen_smooth_matches_pytorch_grad_cam(resnet18):
    """pytorch-grad-cam projects FullGrad's maps at 1/8 of the input size; its projection's sign
    is LAPACK's (here fixed: positively correlated with the maps' sum), and a flipped projection
    gives the complementary heatmap 1 - h."""
    from test_methods import pgc_heatmaps

    x = images(2, 64)
    res = ce.CAMEngine(resnet18, None, "fullgrad", eigen_smooth=True)(x, [3, 8])
    expected = pgc_heatmaps("fullgrad", resnet18, [], x, [3, 8], eigen_smooth=True)
    for b in range(2):
        errors = [(res.heatmaps[b, 0] - e).abs().max() for e in (expected[b], 1 - expected[b])]
        assert min(errors) < HEATMAP_TOL
    plain = ce.CAMEngine(resnet18, None, "fullgrad")(x, [3, 8])
    assert not torch.allclose(plain.heatmaps, res.heatmaps, atol=1e-2)


def test_kpca_eigen_smooth_is_the_plain_map_as_in_pytorch_grad_cam(resnet18):
    """pytorch-grad-cam's KPCA-CAM ignores eigen_smooth (it was refused here)."""
    from test_methods_extra import pgc_maps

    pgc = pytest.importorskip("pytorch_grad_cam")
    x = images(2, 64)
    res = ce.CAMEngine(resnet18, "layer4", "kpca-cam", eigen_smooth=True)(x)
    plain = ce.CAMEngine(resnet18, "layer4", "kpca-cam")(x)
    assert torch.equal(res.heatmaps, plain.heatmaps)
    expected = pgc_maps(pgc.KPCA_CAM, resnet18, "layer4", x, res.classes[:, 0])
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


class _GapHead(nn.Module):
    """A conv stem (2-D or 3-D) and a linear global-average-pool head in one of three forms."""

    def __init__(self, head: str, dims: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        pool = nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.features = nn.Sequential(conv(3, 8, 3, stride=2), nn.ReLU())
        self.head = {
            "linear": nn.Sequential(pool, nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 5)),
            "pool-conv": nn.Sequential(pool, conv(8, 5, 1), nn.Flatten()),
            "conv-pool": nn.Sequential(nn.Dropout(0.2), conv(8, 5, 1), pool, nn.Flatten()),
        }[head]

    def weight(self) -> Tensor:
        layer = next(m for m in self.head if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d))
        return layer.weight.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize(
    ("head", "dims"), [("linear", 3), ("pool-conv", 2), ("conv-pool", 2), ("pool-conv", 3)]
)
def test_cam_on_gap_heads_of_any_rank_and_1x1_conv_heads(head, dims):
    """CAM was refused on AdaptiveAvgPool3d -> linear heads and on 1x1-conv classifiers; its map
    is ``ReLU(sum_c W[k, c] A_c)`` (hand-computed) and its heatmaps Grad-CAM's (autograd)."""
    model = _GapHead(head, dims).double().eval()
    x = torch.randn(2, 3, *(9,) * dims, generator=torch.Generator().manual_seed(1)).double()
    res = ce.CAMEngine(model, "features", "cam")(x, [[1, 3], [4, 0]])
    with torch.no_grad():
        a = model.features(x)
    expected = torch.einsum("bkc,bc...->bk...", model.weight()[res.classes], a).relu()
    assert_close(res.cams, expected, atol=1e-12, rtol=0)
    grad = ce.CAMEngine(model, "features", "gradcam", closed_form=False)(x, res.classes)
    assert_close(res.heatmaps, grad.heatmaps, atol=HEATMAP_TOL, rtol=0)


class _OptionalInput(nn.Module):
    """``forward(x, x2=None, scale=2.0)``: the trace took the ``x2 is not None`` branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.extra, self.fc = nn.Linear(2, 8), nn.Linear(8, 5)

    def forward(self, x: Tensor, x2: Tensor | None = None, scale: float = 2.0) -> Tensor:
        pooled = self.features(x).mean((2, 3))
        if x2 is not None:
            pooled = pooled + self.extra(x2)
        return self.fc(pooled * scale)


def test_models_with_optional_inputs_are_traced_with_their_defaults():
    """It failed with a TypeError (``linear()`` on None)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from test_methods_extra import pgc_maps

    model, x = _OptionalInput().double().eval(), images(2, 16)
    res = ce.CAMEngine(model, "features", "gradcam")(x, [1, 4])
    assert_close(
        res.heatmaps[:, 0],
        pgc_maps(pgc.GradCAM, model, "features", x, [1, 4]),
        atol=HEATMAP_TOL,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("name", "layer"), [("mobilenet_v2", "features.18.0"), ("efficientnet_b0", "features.8.0")]
)
def test_layers_inside_torchvision_op_blocks(name, layer):
    """The tracer kept ``Conv2dNormActivation`` whole, so its conv could not be named (torchcam's
    own tests target it)."""
    from test_methods_extra import built, pgc_maps

    pgc = pytest.importorskip("pytorch_grad_cam")
    model, x = built(name), images(2, 64)
    res = ce.CAMEngine(model, layer, "gradcam")(x, [1, 4])
    assert res.cams.shape == (2, 1, 2, 2)
    expected = pgc_maps(pgc.GradCAM, model, layer, x, [1, 4])
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)


def test_a_layer_inside_a_vit_mlp_block():
    """``mlp.0`` inside torchvision's ``MLPBlock`` (an op block kept whole before), against
    pytorch-grad-cam with the ViT reshape."""
    from test_methods_extra import pgc_maps

    pgc = pytest.importorskip("pytorch_grad_cam")
    model, x = small_vit(), images(2, 32)
    layer = "encoder.layers.encoder_layer_1.mlp.0"
    res = ce.CAMEngine(model, layer, "gradcam", input_size=(32, 32))(x, [1, 4])

    def reshape(tokens: Tensor) -> Tensor:
        return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    expected = pgc_maps(pgc.GradCAM, model, layer, x, [1, 4], reshape_transform=reshape)
    assert_close(res.heatmaps[:, 0], expected, atol=HEATMAP_TOL, rtol=0)
