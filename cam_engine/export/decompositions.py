"""Ops rewritten for the dynamo ONNX exporter: ATen ops replaced while a head's gradient is
traced (:data:`DECOMPOSITIONS`, :func:`head_vjp.trace_head_gradient`), and attention folded to
4-D while a graph is exported (:class:`FoldedAttention`).

The exporter has no ONNX form for most backward ops and bakes some sizes in. Each replacement
here is exact and keeps every size symbolic:

- convolution backward: a transposed convolution cut to the input's size;
- (adaptive) average pooling backward: window matrices built from the sizes in the graph,
  ``grad_x = R^T @ grad @ C`` (adaptive pooling forward as bin matrices too);
- ``as_strided`` views that cover a whole contiguous tensor in its own element order: a
  ``view``. ``adaptive_avg_pool2d`` to 1x1 of a channels-last-strided map (Hugging Face Swin /
  FocalNet pool a transposed token map) restrides its result with ``as_strided_``, whose
  backward writes into an ``as_strided`` view of a zero buffer; exported, that becomes
  ``as_strided_scatter``, which has no ONNX form;
- attention over more than one batch dimension (timm Hiera's mask units): torch.onnx converts
  ``scaled_dot_product_attention`` of 4-D query, key and value only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._decomp import core_aten_decompositions
from torch._prims_common import make_contiguous_strides_for
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.overrides import TorchFunctionMode

from .graphs import _bins, _windows, adaptive_avg_pool

__all__ = ["DECOMPOSITIONS", "FoldedAttention"]

aten = torch.ops.aten


def _adaptive_avg_pool2d_backward(grad: Tensor, x: Tensor) -> Tensor:
    """The transpose of :func:`adaptive_avg_pool`: ``P_h^T @ grad @ P_w``."""
    rows = _bins(x.shape[-2], grad.shape[-2], grad)
    cols = _bins(x.shape[-1], grad.shape[-1], grad)
    return torch.einsum("ih,jw,bcij->bchw", rows, cols, grad)


def _two(values: Sequence[int]) -> tuple[int, int]:
    """An ATen ``int[2]`` argument: one value for both dimensions, or two."""
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _pool_windows(
    size_in, size_out, kernel: int, stride: int, padding: int, count_pad: bool, like: Tensor
) -> Tensor:
    """(size_out, size_in) weights of average pooling along one dimension, as ATen pools.

    Window ``o`` covers inputs ``[o*stride - padding, o*stride - padding + kernel)``; its
    divisor counts the inputs it covers, or with ``count_pad`` also the padding, up to the
    padded input's end (a ``ceil_mode`` window past it counts less).
    """
    start = torch.arange(size_out, device=like.device) * stride - padding
    inside = _windows(start, start + kernel, size_in, like)
    if count_pad:
        overhang = (start + kernel - (size_in + padding)).clamp(min=0)
        divisor = (kernel - overhang).to(like.dtype)
    else:  # a window wholly in the padding covers nothing and passes no gradient
        divisor = inside.sum(1).clamp(min=1)
    return inside / divisor[:, None]


def _avg_pool2d_backward(
    grad: Tensor,
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Tensor:
    """dScore/dx of ``F.avg_pool2d``: ``R^T @ grad @ C`` with the window matrices of
    :func:`_pool_windows` (``ceil_mode`` is already in ``grad``'s size)."""
    kernel, pad = _two(kernel_size), _two(padding)
    step = _two(stride) if stride else kernel  # no stride: the kernel's
    count_pad = count_include_pad and divisor_override is None
    rows, cols = (
        _pool_windows(x.shape[d], grad.shape[d], kernel[i], step[i], pad[i], count_pad, grad)
        for i, d in enumerate((-2, -1))
    )
    if divisor_override is not None:  # the windows' own counts are replaced
        rows = (rows > 0).to(grad.dtype)
        cols = (cols > 0).to(grad.dtype) / divisor_override
    return torch.einsum("ih,jw,...ij->...hw", rows, cols, grad)


def _convolution_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias_sizes,
    stride,
    padding,
    dilation,
    transposed: bool,
    output_padding,
    groups: int,
    output_mask,
) -> tuple[Tensor | None, None, None]:
    """dScore/dx of a convolution as the transposed convolution of ``grad`` (the weights'
    and bias's gradients are not asked for: the parameters are constants of the graph).

    The transposed convolution takes the largest output padding, ``stride - 1``, and is cut to
    the input's size: which rows an input of a given size leaves over depends on the size, and
    an exported ``output_padding`` would be fixed.
    """
    if transposed or any(output_mask[1:]):
        raise NotImplementedError(
            "aten.convolution_backward of a transposed convolution or for the weights"
        )
    transpose = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[x.ndim]
    extra = [max(s, d) - 1 for s, d in zip(stride, dilation, strict=True)]
    grad_x = transpose(grad, weight, None, stride, padding, extra, groups, dilation)
    for dim in range(2, x.ndim):
        grad_x = grad_x.narrow(dim, 0, x.shape[dim])
    return grad_x, None, None


def _known(condition) -> bool:
    """``condition`` holds for every value of the symbolic sizes in it (no guard is added: a
    guard would fix a size of the traced graph)."""
    return statically_known_true(condition)


def _dense(sizes: Sequence, strides: Sequence) -> bool:
    """Whether ``strides`` are the contiguous strides of ``sizes`` (any stride on a size-1 dim)."""
    want = make_contiguous_strides_for(sizes)
    return all(
        _known(n == 1) or _known(s == w) for n, s, w in zip(sizes, strides, want, strict=True)
    )


def _whole_in_order(x: Tensor, size: Sequence, stride: Sequence, offset) -> bool:
    """Whether ``x.as_strided(size, stride, offset)`` is ``x.view(size)``: ``x`` contiguous
    from its storage's start, the view contiguous and of all of ``x``'s elements."""
    return (
        _known(x.storage_offset() == 0)
        and (offset is None or _known(offset == 0))
        and _dense(x.shape, x.stride())
        and _dense(size, stride)
        and _known(x.numel() == math.prod(size))
    )


def _as_strided(x: Tensor, size, stride, storage_offset=None) -> Tensor:
    if _whole_in_order(x, size, stride, storage_offset):
        return x.view(size)
    return NotImplemented  # traced as it is


def _as_strided_(x: Tensor, size, stride, storage_offset=None) -> Tensor:
    if len(size) != x.ndim or not all(_known(a == b) for a, b in zip(size, x.shape, strict=True)):
        return NotImplemented
    if _whole_in_order(x, size, stride, storage_offset):
        return x  # a restride that moves no element
    return NotImplemented


#: ATen op -> its replacement while the head's gradient is traced: PyTorch's core ATen
#: decompositions (backward ops become forward ones), then ours (later entries win)
DECOMPOSITIONS: dict = {
    **core_aten_decompositions(),
    aten._adaptive_avg_pool2d.default: adaptive_avg_pool,
    aten._adaptive_avg_pool2d_backward.default: _adaptive_avg_pool2d_backward,
    aten.avg_pool2d_backward.default: _avg_pool2d_backward,
    aten.convolution_backward.default: _convolution_backward,
    aten.as_strided.default: _as_strided,
    aten.as_strided_.default: _as_strided_,
}


_ATTENTION = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)


class FoldedAttention(TorchFunctionMode):
    """While active, attention of query, key and value with more than 4 dimensions, (*lead,
    L, E) with several lead dimensions ((B, heads, windows, N, d) in timm Hiera), runs as 4-D
    attention: the lead dimensions but the last folded into one, unfolded after (each lead
    index attends on its own, so folding changes nothing). A mask is broadcast and folded
    alike. torch.onnx converts ``scaled_dot_product_attention`` of 4-D inputs only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ATTENTION and args[0].ndim > 4 and args[1].ndim == args[0].ndim:
            return _folded_attention(func, *args, **kwargs)
        return func(*args, **kwargs)


def _folded_attention(attention, query, key, value, attn_mask=None, *args, **kwargs) -> Tensor:
    lead = query.shape[:-3]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2]).flatten(0, -4)
    folded = (t.flatten(0, -4) for t in (query, key, value))
    return attention(*folded, attn_mask, *args, **kwargs).unflatten(0, lead)
