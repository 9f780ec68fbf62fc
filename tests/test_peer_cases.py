"""Issue #16's peer cases: defects found against the peers (pytorch-grad-cam 1.5.7, torchcam 0.5)
and the small capabilities they have, each checked against an independent reference (float64,
CPU, tiny models)."""

from __future__ import annotations

import torch
from conftest import images
from test_methods import HEATMAP_TOL, minmax
from test_methods_peer import small_vit
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

import cam_engine as ce


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
