"""The exportable graphs: a model split at its target layer, with the CAM computed inside.

Each graph is an ``nn.Module`` ``forward(x[, classes]) -> (logits, classes, maps)`` built from
plain tensor ops only (no autograd, no hooks), so both ONNX exporters turn it into a static
graph that stays exact at every batch size and, where the ops allow, every input size:

- :class:`GapCAM`: a global-average-pool -> linear head (channels-first or channels-last ``A``,
  a linear layer or a 1x1 convolution; as :func:`cam_engine.heads.find_gap_linear` reads it).
  dScore/dA is ``W[c] / (h*w)``, so the FC rows of the chosen classes are gathered and
  contracted with ``A`` (CAM and Grad-CAM differ only by that ``1 / (h*w)``, which min-max
  normalisation removes);
- :class:`PoolMLPGradCAM`: pooling -> flatten -> MLP heads (VGG, MobileNetV3, ConvNeXt's
  ``LayerNorm2d`` on the 1x1 pooled map). Grad-CAM needs only the spatial sum of dScore/dA, and
  pooling passes gradient sums through unchanged, so the backward runs through the MLP only,
  written out as matrix products, activation derivatives and LayerNorm backwards.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import pair, read_head
from ..model import CAMModel, select_output
from ..postprocess import colormap_lut, normalize

__all__ = ["Postprocess", "GapCAM", "PoolMLP", "PoolMLPGradCAM", "find_pool_mlp"]


class Postprocess(nn.Module):
    """Raw maps (B, K, h, w) -> heatmaps (B, K, H, W) in [0, 1], or overlays uint8 (B, K, 3, H, W).

    The engine's rule (bilinear, half-pixel, then min-max of the full-resolution map). The size
    is read from ``x`` in the graph, so it follows the input. ``postprocess.upsample`` is not
    reused: it converts sizes to Python ints, which a tracing exporter would bake in.

    Args:
        upsample: resize to the input's (H, W).
        normalize: min-max normalise each map.
        colormap: a colour map name: the output is an overlay on the input picture, recovered as
            ``x * std + mean`` (the inverse of the usual ``Normalize(mean, std)``).
        alpha: weight of the colour in the overlay.
        mean, std: per-channel normalisation of ``x``.
    """

    def __init__(
        self,
        upsample: bool = True,
        normalize: bool = True,
        colormap: str | None = None,
        alpha: float = 0.5,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        self.check_arguments(upsample, normalize, colormap, alpha)
        self.upsample = upsample
        self.normalize = normalize
        self.alpha = alpha
        self.lut: Tensor | None
        if colormap is None:
            self.lut = None
        else:
            self.register_buffer("lut", colormap_lut(colormap).float().clone())
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @staticmethod
    def check_arguments(upsample: bool, normalize: bool, colormap: str | None, alpha) -> None:
        """``ValueError`` for arguments the constructor cannot take (see the class)."""
        if colormap is not None:
            colormap_lut(colormap)  # unknown names list the available ones
            if not (upsample and normalize):
                raise ValueError("an overlay needs upsample=True and normalize=True")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")

    def forward(self, cams: Tensor, x: Tensor) -> Tensor:
        maps = cams.float()
        if self.upsample:
            maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.normalize:
            maps = normalize(maps)
        if self.lut is None:
            return maps
        # as postprocess.overlay with float images: level round(255 h), colour table, blend
        levels = maps.mul(255).round().clamp(0, 255).long()
        colours = self.lut[levels].permute(0, 1, 4, 2, 3)
        base = (x.float() * self.std + self.mean).clamp(0, 1).mul(255).round()
        blended = colours * self.alpha + base.unsqueeze(1) * (1.0 - self.alpha)
        return blended.round().clamp(0, 255).to(torch.uint8)


def _top_classes(logits: Tensor, topk: int) -> Tensor:
    # TopK with k a constant (TensorRT accepts it only as an initializer), best first; in float32
    # so that an fp16 model ranks its classes as the float32 one does
    return logits.float().topk(topk, dim=1).indices


class _CAMGraph(nn.Module):
    """Shared plumbing: input dtype, the classes (top-k or given), and the postprocess."""

    def __init__(self, topk: int, post: Postprocess, dtype: torch.dtype) -> None:
        super().__init__()
        self.topk = topk
        self.post = post
        self.dtype = dtype

    def maps(self, x: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(logits (B, N), classes (B, K), cams (B, K, h, w)) of images ``x`` in model dtype."""
        raise NotImplementedError

    def forward(self, x: Tensor, classes: Tensor | None = None) -> tuple[Tensor, ...]:
        """(logits, classes, maps), or (logits, maps) when ``classes`` are given: an ONNX
        output cannot take the name of the ``classes`` input."""
        given = classes is not None
        logits, classes, cams = self.maps(x.to(self.dtype), classes)
        maps = self.post(cams, x)
        return (logits.float(), maps) if given else (logits.float(), classes, maps)


class GapCAM(_CAMGraph):
    """CAM / Grad-CAM of a global-average-pool -> linear head, as one gather and one einsum.

    Args:
        model: the split model (its current split must have a ``gap`` head).
        method: ``"cam"`` (weights ``W[c]``) or ``"gradcam"`` (``W[c] / (h*w)``).
        topk: classes explained per image when none are given.
        post: what to do with the raw maps.
    """

    def __init__(self, model: CAMModel, method: str, topk: int, post: Postprocess) -> None:
        built = model.current()
        weight = built.gap.weight.detach()
        super().__init__(topk, post, weight.dtype)
        self.trunk = built.split.trunk
        self.head = built.split.head
        self.clone_features = built.head_inplace
        self.output = model.output
        self.per_position = method == "gradcam"
        self.channels_last = built.gap.channels_last
        self.register_buffer("weight", weight.clone())

    def maps(self, x: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        features, *extras = self.trunk(x)
        head_input = features.clone() if self.clone_features else features
        logits = select_output(self.head(head_input, *extras), self.output)
        if classes is None:
            classes = _top_classes(logits, self.topk)
        # float32 contraction: an fp16 sum over C channels would lose the small maps
        rows = self.weight[classes].float()
        if self.channels_last:  # the layout the head pools, read by heads.find_gap_linear
            features = features.permute(0, 3, 1, 2)
        if self.per_position:
            rows = rows / (features.shape[-2] * features.shape[-1])
        cams = torch.einsum("bkc,bchw->bkhw", rows, features.float()).relu()
        return logits, classes, cams


# Pool -> MLP heads ------------------------------------------------------------------------------


@dataclass
class PoolMLP:
    """A head ``A -> pool* -> [channel LayerNorm] -> flatten -> (Linear | activation |
    LayerNorm | inactive Dropout)*``.

    Attributes:
        pools: pooling modules applied to ``A`` in order; each passes gradient sums unchanged.
        layers: the MLP on the flattened (B, D) pooled map: ``nn.Linear``, ``nn.LayerNorm`` over
            the last dimension and elementwise activation modules (ReLU, Hardswish, SiLU, exact
            GELU). A LayerNorm over the channels of a 1x1 pooled map (ConvNeXt) is its first
            layer: on (B, C, 1, 1) it is the same LayerNorm of the flattened (B, C) vector.
    """

    pools: list[nn.Module]
    layers: list[nn.Module]


def _conserves_gradient_sum(module: nn.Module) -> bool:
    """Whether each output's gradient reaches the input in full (sum of dS/dA preserved)."""
    if isinstance(module, nn.MaxPool2d | nn.AdaptiveAvgPool2d):
        return True  # max: all to the argmax; adaptive avg: 1/|bin| to each of |bin| inputs
    if isinstance(module, nn.AdaptiveMaxPool2d):
        return pair(module.output_size) == (1, 1)  # a global max, exported as ReduceMax
    if isinstance(module, nn.AvgPool2d):
        # a zero padding counted in the divisor takes its share of the gradient away
        padded = pair(module.padding) != (0, 0) and module.count_include_pad
        return not padded and module.divisor_override is None
    return False


def _has_derivative(activation: nn.Module) -> bool:
    """Whether :func:`derivative` knows the activation (exact GELU, not its tanh form)."""
    exact_gelu = isinstance(activation, nn.GELU) and activation.approximate == "none"
    return isinstance(activation, nn.ReLU | nn.Hardswish | nn.SiLU) or exact_gelu


def derivative(activation: nn.Module, z: Tensor) -> Tensor:
    """d activation(z) / dz, elementwise, as torch's own backward defines it at the kinks."""
    if isinstance(activation, nn.ReLU):
        return (z > 0).to(z.dtype)
    if isinstance(activation, nn.Hardswish):
        inner = (2 * z + 3) / 6
        return torch.where(z < -3, torch.zeros_like(z), torch.where(z <= 3, inner, 1.0))
    if isinstance(activation, nn.SiLU):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    cdf = 0.5 * (1 + torch.erf(z * 0.7071067811865476))  # exact GELU: Phi(z) + z phi(z)
    return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


def layer_norm_backward(norm: nn.LayerNorm, x: Tensor, grads: Tensor) -> Tensor:
    """dScore/dx through ``y = norm(x)`` over the last dimension D, from dScore/dy.

    With ``xhat = (x - mean) / sigma``, ``sigma = sqrt(biased var + eps)`` and ``g' = g * gamma``:
    ``dx = (g' - mean(g') - xhat * mean(g' * xhat)) / sigma``, means over D.

    Args:
        norm: a LayerNorm with ``normalized_shape == (D,)``.
        x: (B, D) its input.
        grads: (B, K, D) dScore/dy of K classes.

    Returns:
        (B, K, D) in the dtype of ``grads``.
    """
    # float32 at least: an fp16 variance over hundreds of channels loses the small ones
    dtype = torch.promote_types(grads.dtype, torch.float32)
    x = x.to(dtype)
    centered = x - x.mean(-1, keepdim=True)
    sigma = (centered.square().mean(-1, keepdim=True) + norm.eps).sqrt().unsqueeze(1)
    xhat = centered.unsqueeze(1) / sigma
    g = grads.to(dtype) if norm.weight is None else grads.to(dtype) * norm.weight.to(dtype)
    dx = g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)
    return (dx / sigma).to(grads.dtype)


def _pooled_to_one(pools: list[nn.Module]) -> bool:
    """Whether the pooled map is 1x1 at every input size: the last pool is adaptive to 1x1."""
    last = pools[-1] if pools else None
    adaptive = isinstance(last, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d)
    return adaptive and pair(last.output_size) == (1, 1)


def find_pool_mlp(head: fx.GraphModule) -> PoolMLP:
    """Read a pool -> flatten -> MLP head, or raise ``ValueError`` naming the first other op.

    The head is read by :func:`cam_engine.heads.read_head`, as the engine's closed form is.
    """
    chain = read_head(head)
    if chain.side_outputs:
        raise ValueError(
            f"the head branches after {chain.side_outputs[0]!r} (to its output); only heads "
            "that output the logits alone are supported"
        )
    pools, layers, flat = [], [], False
    for op in chain.ops:
        # pools come first: the graph pools before it runs the layers
        if op.kind == "pool" and not (flat or layers) and _conserves_gradient_sum(op.module):
            pools.append(op.module)
            flat = op.flattens
        elif op.kind == "channel-norm" and not flat:
            if not _pooled_to_one(pools):
                raise ValueError(
                    f"the LayerNorm over channels (LayerNorm2d) at {op.where} is supported "
                    "only on a 1x1 pooled map, where it is a LayerNorm of the flattened vector; "
                    "the map before it is not adaptively pooled to 1x1"
                )
            layers.append(op.module)
        elif op.kind == "flatten":
            flat = True
        elif flat and (
            op.kind in ("linear", "layer-norm")
            or (op.kind == "activation" and _has_derivative(op.module))
        ):
            layers.append(op.module)
        elif op.kind == "dropout":
            if op.module is not None and op.module.training and op.module.p > 0:
                raise ValueError(f"{op.where} is active: call model.eval() first")
        else:
            raise ValueError(f"unsupported op in the head: {op.where}")
    if chain.stop is not None:
        raise ValueError(chain.stop)
    if not any(isinstance(layer, nn.Linear) for layer in layers):
        raise ValueError("the head has no linear layer after flattening")
    return PoolMLP(pools, layers)


def adaptive_avg_pool(x: Tensor, output_size) -> Tensor:
    """``F.adaptive_avg_pool2d`` as ``P_h @ x @ P_w^T``: exact at every input size once exported.

    Both exporters bake a non-global adaptive pooling into a fixed kernel; these bin matrices
    are built from the input's shape in the graph instead.
    """
    out_h, out_w = pair(output_size)
    rows = _bins(x.shape[-2], out_h, x) if out_h is not None else None
    cols = _bins(x.shape[-1], out_w, x) if out_w is not None else None
    if rows is not None:
        x = torch.einsum("ih,bchw->bciw", rows, x)
    if cols is not None:
        x = torch.einsum("jw,bchw->bchj", cols, x)
    return x


def _bins(size_in, size_out: int, like: Tensor) -> Tensor:
    """(size_out, size_in) averaging matrix of adaptive pooling bins [floor(i n/m), ceil(..))."""
    i = torch.arange(size_out, device=like.device)
    start = torch.div(i * size_in, size_out, rounding_mode="floor")
    end = torch.div((i + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
    return _windows(start, end, size_in, like) / (end - start)[:, None].to(like.dtype)


def _windows(start: Tensor, end: Tensor, size_in, like: Tensor) -> Tensor:
    """(n, size_in) in ``like``'s dtype: row ``o`` is 1 on inputs ``[start[o], end[o])``, 0
    elsewhere (a window's part outside ``[0, size_in)`` covers nothing)."""
    j = torch.arange(size_in, device=like.device)
    return ((j[None] >= start[:, None]) & (j[None] < end[:, None])).to(like.dtype)


def _pool(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return adaptive_avg_pool(x, module.output_size)
    if isinstance(module, nn.AdaptiveMaxPool2d):
        return x.amax(dim=(-2, -1), keepdim=True)
    return module(x)


class PoolMLPGradCAM(_CAMGraph):
    """Grad-CAM of a pool -> flatten -> MLP head with its backward written out.

    The weights are the spatial mean of dScore/dA: the sum over the pooled grid of dScore/dP
    (pooling conserves gradient sums) divided by ``h*w``. dScore/dP is the MLP's backward:
    ``g = W_last[c]``, then ``g *= f'(z)`` at each activation, ``g = g @ W`` at each linear
    layer and :func:`layer_norm_backward` at each LayerNorm.

    Args:
        model: the split model.
        head: the parsed head (:func:`find_pool_mlp`).
        topk: classes explained per image when none are given.
        post: what to do with the raw maps.
    """

    def __init__(self, model: CAMModel, head: PoolMLP, topk: int, post: Postprocess) -> None:
        linear = next(layer for layer in head.layers if isinstance(layer, nn.Linear))
        super().__init__(topk, post, linear.weight.dtype)
        self.trunk = model.current().split.trunk
        self.pools = nn.ModuleList(head.pools)
        self.layers = nn.ModuleList(head.layers)

    def maps(self, x: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        (features,) = self.trunk(x)
        pooled = features
        for pool in self.pools:
            pooled = _pool(pool, pooled)
        value, saved = pooled.flatten(1), []
        for layer in self.layers:  # saved before the layer runs: activations may work in place
            if isinstance(layer, nn.LayerNorm):
                saved.append(value)
            elif not isinstance(layer, nn.Linear):
                saved.append(derivative(layer, value))
            value = layer(value)
        logits = value
        if classes is None:
            classes = _top_classes(logits, self.topk)
        grads = self._backward(classes, saved, logits.shape[1])
        spatial = features.shape[-2] * features.shape[-1]
        weights = grads.float().unflatten(2, (features.shape[1], -1)).sum(-1) / spatial
        cams = torch.einsum("bkc,bchw->bkhw", weights, features.float()).relu()
        return logits, classes, cams

    def _backward(self, classes: Tensor, saved: list[Tensor], num_classes: int) -> Tensor:
        """dScore/dP of each class: (B, K, D) for the flattened pooled map.

        Args:
            classes: (B, K) class ids.
            saved: in layer order, (B, D_i) for each layer that is not linear: its input for a
                LayerNorm, its derivative f'(z) for an activation (consumed by this call).
            num_classes: N, the width of the logits.
        """
        layers = list(self.layers)
        if isinstance(layers[-1], nn.Linear):
            grads = layers.pop().weight[classes]  # the one-hot times the last layer
        else:
            arange = torch.arange(num_classes, device=classes.device)
            grads = (classes[..., None] == arange).to(self.dtype)
        for layer in reversed(layers):
            if isinstance(layer, nn.Linear):
                grads = grads @ layer.weight
            elif isinstance(layer, nn.LayerNorm):
                grads = layer_norm_backward(layer, saved.pop(), grads)
            else:
                grads = grads * saved.pop().unsqueeze(1)
        return grads
