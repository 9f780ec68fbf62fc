"""Export blockers of issue 19: the traced head gradient's decompositions
(export/decompositions.py) against autograd in float64 or in the traced graph, then tiny models
exported with ``to_onnx``, whose self-check runs the file on ONNX Runtime against the float64
PyTorch engine at batch 3 (and, with ``dynamic_size``, at a second input size). One export
covers both head decompositions: exports are the slow part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cam_engine.export import to_onnx
from cam_engine.export.decompositions import FoldedAttention
from cam_engine.export.head_vjp import DECOMPOSITIONS, trace_head_gradient

aten = torch.ops.aten


# --- decompositions -------------------------------------------------------------------------------


def test_avg_pool2d_backward_decomposition_matches_autograd():
    decomposed = DECOMPOSITIONS[aten.avg_pool2d_backward.default]
    cases = [  # kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
        ([2, 2], [2, 2], [0, 0], False, True, None),
        ([3, 2], [2, 1], [1, 1], True, True, None),  # overlapping, padded, a short last window
        ([3, 3], [2, 2], [1, 0], True, False, None),  # padding not counted
        ([3], [], [1], False, True, 5),  # one value for both dims, stride = kernel, override
        ([9, 9], [9, 9], [0, 0], True, True, None),  # Hugging Face EfficientNet: kernel > map
    ]
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    for kernel, stride, padding, ceil, count_pad, divisor in cases:
        y = F.avg_pool2d(x, kernel, stride or None, padding, ceil, count_pad, divisor)
        grad = torch.randn_like(y)
        (want,) = torch.autograd.grad(y, x, grad)
        got = decomposed(grad, x, kernel, stride, padding, ceil, count_pad, divisor)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_avg_pool_head_gradient_holds_at_other_sizes():
    def head(features):  # the square makes the gradient depend on the features
        return F.avg_pool2d(features, 3, 2, 1, ceil_mode=True).square().sum((2, 3))

    graph = trace_head_gradient(head, torch.randn(2, 3, 8, 10).double(), (), None, 2, False)
    assert aten.avg_pool2d_backward.default not in {node.target for node in graph.graph.nodes}
    features = torch.randn(3, 3, 11, 6, dtype=torch.float64, requires_grad=True)  # odd: ceil
    logits, classes, grads = graph(features.detach())
    for k in range(2):
        (want,) = torch.autograd.grad(head(features).gather(1, classes[:, k : k + 1]).sum(),
                                      features)  # fmt: skip
        torch.testing.assert_close(grads[:, k], want)


def test_token_pool_head_traces_without_as_strided():
    """Hugging Face Swin / FocalNet's head: tokens (B, T, C) -> transpose -> AdaptiveAvgPool1d(1)
    -> flatten -> linear. The pool restrides its channels-last-strided result (``as_strided_``);
    traced, the backward of that copies into an ``as_strided`` view of a zero buffer, which
    exports as ``as_strided_scatter``: no ONNX form."""
    head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(1), nn.Linear(8, 5))
    graph = trace_head_gradient(lambda t: head(t.transpose(1, 2)), torch.randn(2, 6, 8), (),
                                None, 2, False)  # fmt: skip
    ops = {str(node.target) for node in graph.graph.nodes}
    assert not [op for op in ops if "as_strided" in op]


def test_folded_attention_matches_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) for _ in range(3))  # 5-D
    mask = torch.randn(4, 5, 5, dtype=torch.float64)  # broadcast over the first two dims
    want = F.scaled_dot_product_attention(q, k, v, mask)
    with FoldedAttention():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- exports --------------------------------------------------------------------------------------


class BlockersNet(nn.Module):
    """Issue 19's export blockers in one tiny model (exports are the slow part of a test):

    - trunk: timm Hiera's mask-unit attention, 5-D query, key and value (B, heads, windows, N,
      d), which torch.onnx converts for 4-D inputs only;
    - head: a padded, overlapping ``ceil_mode`` average pooling (``avg_pool2d_backward``: no
      ONNX form), then Hugging Face Swin's token head (``as_strided_scatter``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.token_pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        f = self.embed(x)
        tokens = f.flatten(2).transpose(1, 2)  # windows of 4 tokens in raster order
        qkv = self.qkv(tokens).reshape(f.shape[0], 1, -1, 4, 3, f.shape[1])
        q, k, v = qkv.permute(4, 0, 1, 2, 3, 5).unbind(0)
        mixed = F.scaled_dot_product_attention(q, k, v).reshape(tokens.shape)
        f = self.proj((tokens + mixed).transpose(1, 2).reshape(f.shape))
        tokens = self.pool(f).flatten(2).transpose(1, 2)
        return self.fc(self.token_pool(tokens.transpose(1, 2)).flatten(1))


def test_blockers_export(tmp_path):
    # at one input size: dynamic_size doubles the export's time, and the traced gradient's
    # sizes are checked symbolic above (BlockersNet passes with dynamic_size=True too)
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    result = to_onnx(BlockersNet().eval(), path, "proj", method="gradcam", topk=2,
                     input_size=(40, 32))  # fmt: skip
    assert result.metadata["head"] == "head-vjp"
    assert max(result.errors.values()) < 1e-4  # ORT vs engine at batch 3


class BatchReshapeNet(nn.Module):
    """A trunk that reshapes with its batch size (Hugging Face MobileViT's unfolding) behind a
    Python branch on the map's size, which torch.fx cannot trace: it splits by torch.export.
    The TorchScript exporter records its ``sym_size`` calls as constants (batch 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        f = self.conv(x)
        b, c, h, w = f.shape
        if h % 2 == 0:
            f = f.reshape(b * c * h // 2, 2 * w).softmax(-1).reshape(b, c, h, w)
        return self.fc(self.act(f).mean((2, 3)))


def test_torch_export_trunk_keeps_its_batch_symbolic(tmp_path):
    torch.manual_seed(0)
    model = BatchReshapeNet().eval()
    path = tmp_path / "model.onnx"
    result = to_onnx(model, path, "act", method="cam", topk=2, input_size=(32, 32))
    assert result.metadata["exporter"] == "dynamo"
    assert max(result.errors.values()) < 1e-4  # ORT vs engine at batch 3
