"""The exportable graphs: a model split at its target layer, with the CAM computed inside.

Each graph is an ``nn.Module`` ``forward(x[, classes]) -> (logits, classes, maps)`` built from
plain tensor ops only (no autograd, no hooks), so both ONNX exporters turn it into a static
graph that stays exact at every batch size and, where the ops allow, every input size:

- :class:`GapCAM`: a global-average-pool -> linear head. dScore/dA is ``W[c] / (h*w)``, so the
  FC rows of the chosen classes are gathered and contracted with ``A`` (CAM and Grad-CAM differ
  only by that ``1 / (h*w)``, which min-max normalisation removes);
- :class:`PoolMLPGradCAM`: pooling -> flatten -> MLP heads (VGG, MobileNetV3, ConvNeXt's
  ``LayerNorm2d`` on the 1x1 pooled map). Grad-CAM needs only the spatial sum of dScore/dA, and
  pooling passes gradient sums through unchanged, so the backward runs through the MLP only,
  written out as matrix products, activation derivatives and LayerNorm backwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d

from ..heads import _arg, _dropout, _is_flatten, _is_shape_query
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
        if colormap is not None and not (upsample and normalize):
            raise ValueError("an overlay needs upsample=True and normalize=True")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
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
        self.register_buffer("weight", weight.clone())

    def maps(self, x: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        features, *extras = self.trunk(x)
        head_input = features.clone() if self.clone_features else features
        logits = select_output(self.head(head_input, *extras), self.output)
        if classes is None:
            classes = _top_classes(logits, self.topk)
        # float32 contraction: an fp16 sum over C channels would lose the small maps
        rows = self.weight[classes].float()
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
        return tuple(_pair(module.output_size)) == (1, 1)  # a global max, exported as ReduceMax
    if isinstance(module, nn.AvgPool2d):
        # a zero padding counted in the divisor takes its share of the gradient away
        padded = _pair(module.padding) != (0, 0) and module.count_include_pad
        return not padded and module.divisor_override is None
    return False


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module {node.target!r}"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target!r} (node {node.name!r})"


_ACTIVATIONS = (nn.ReLU, nn.Hardswish, nn.SiLU)


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The elementwise activation a node applies (one with a derivative below), else None."""
    if node.op == "call_module":
        module = modules[node.target]
        exact_gelu = isinstance(module, nn.GELU) and module.approximate == "none"
        return module if isinstance(module, _ACTIVATIONS) or exact_gelu else None
    if node.target in (F.relu, torch.relu, torch.relu_, "relu", "relu_"):
        return nn.ReLU()
    return None


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


def _flat_layer_norm(shape, weight: Tensor | None, bias: Tensor | None, eps: float) -> nn.LayerNorm:
    """A plain ``nn.LayerNorm`` sharing the given parameters (either may be absent)."""
    norm = nn.LayerNorm(shape, eps, elementwise_affine=False)
    norm.weight, norm.bias = weight, bias
    return norm


def _layer_norm(node: fx.Node, head: fx.GraphModule) -> nn.LayerNorm | None:
    """The LayerNorm over the last dimension a node applies (module or functional), else None."""
    if node.op == "call_module":
        module = head.get_submodule(node.target)
        # the exact type: subclasses (LayerNorm2d) normalise other dimensions in their forward
        plain = type(module) is nn.LayerNorm and len(module.normalized_shape) == 1
        return module if plain else None
    if node.op != "call_function" or node.target is not F.layer_norm:
        return None
    shape, eps = _arg(node, 1, "normalized_shape"), _arg(node, 4, "eps", 1e-5)
    affine = [_arg(node, 2, "weight"), _arg(node, 3, "bias")]
    over_last = isinstance(shape, tuple | list) and len(shape) == 1
    if not over_last or any(a is not None and a.op != "get_attr" for a in affine):
        return None
    weight, bias = (a if a is None else head.get_parameter(a.target) for a in affine)
    return _flat_layer_norm(shape, weight, bias, eps)


def _permutes(node: fx.Node, dims: tuple[int, ...]) -> bool:
    """Whether ``node`` permutes the dimensions of a 4-d tensor into the order ``dims``."""
    method = node.op == "call_method" and node.target == "permute"
    if not (method or (node.op == "call_function" and node.target is torch.permute)):
        return False
    order = node.kwargs.get("dims", node.args[1:])
    order = order[0] if len(order) == 1 and isinstance(order[0], tuple | list) else order
    return all(isinstance(d, int) for d in order) and tuple(d % 4 for d in order) == dims


def _next(node: fx.Node) -> fx.Node:
    """The one node using ``node``'s value (shape queries aside); ``ValueError`` on a branch."""
    users = [u for u in node.users if not _is_shape_query(u)]
    if len(users) != 1:
        raise ValueError(f"the head branches after {node.name!r}; only chains are supported")
    return users[0]


def _channel_norm(node: fx.Node, head: fx.GraphModule) -> tuple[nn.LayerNorm, fx.Node] | None:
    """The LayerNorm over the channels of a (B, C, h, w) map starting at ``node``, as a LayerNorm
    of the last dimension, and its last node: a ``LayerNorm2d`` module kept as a leaf, or its
    traced ``permute(0, 2, 3, 1) -> layer_norm -> permute(0, 3, 1, 2)``. None if neither."""
    if node.op == "call_module":
        module = head.get_submodule(node.target)
        if not isinstance(module, LayerNorm2d):
            return None
        norm = _flat_layer_norm(module.normalized_shape, module.weight, module.bias, module.eps)
        return norm, node
    if not _permutes(node, (0, 2, 3, 1)):
        return None
    norm = _layer_norm(inner := _next(node), head)
    if norm is None or not _permutes(end := _next(inner), (0, 3, 1, 2)):
        return None
    return norm, end


def _pooled_to_one(pools: list[nn.Module]) -> bool:
    """Whether the pooled map is 1x1 at every input size: the last pool is adaptive to 1x1."""
    last = pools[-1] if pools else None
    adaptive = isinstance(last, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d)
    return adaptive and _pair(last.output_size) == (1, 1)


def find_pool_mlp(head: fx.GraphModule) -> PoolMLP:
    """Read a pool -> flatten -> MLP head, or raise ``ValueError`` naming the first other op."""
    modules = dict(head.named_modules())
    placeholders = [n for n in head.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(
            f"the head takes {len(placeholders)} inputs (a value crosses the cut at the target "
            "layer); only heads fed by the target map alone can be exported"
        )
    node, pools, layers, flat = placeholders[0], [], [], False
    while (node := _next(node)).op != "output":
        # pools come first: the graph pools before it runs the layers
        pooling = not flat and not layers and node.op == "call_module"
        if pooling and _conserves_gradient_sum(modules[node.target]):
            pools.append(modules[node.target])
        elif not flat and (channel_norm := _channel_norm(node, head)) is not None:
            if not _pooled_to_one(pools):
                raise ValueError(
                    f"the LayerNorm over channels (LayerNorm2d) at {_describe(node, modules)} "
                    "is supported only on a 1x1 pooled map, where it is a LayerNorm of the "
                    "flattened vector; the map before it is not adaptively pooled to 1x1"
                )
            norm, node = channel_norm
            layers.append(norm)
        elif not flat and _is_flatten(node, modules):
            flat = True
        elif flat and node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            layers.append(modules[node.target])
        elif flat and (norm := _layer_norm(node, head)) is not None:
            layers.append(norm)
        elif flat and (activation := _activation(node, modules)) is not None:
            layers.append(activation)
        elif (dropout := _dropout(node, modules)) is not None:
            if isinstance(dropout, nn.Module) and dropout.training and dropout.p > 0:
                raise ValueError(f"dropout {node.target!r} is active: call model.eval() first")
        else:
            raise ValueError(f"unsupported op in the head: {_describe(node, modules)}")
    if not any(isinstance(layer, nn.Linear) for layer in layers):
        raise ValueError("the head has no linear layer after flattening")
    return PoolMLP(pools, layers)


def adaptive_avg_pool(x: Tensor, output_size) -> Tensor:
    """``F.adaptive_avg_pool2d`` as ``P_h @ x @ P_w^T``: exact at every input size once exported.

    Both exporters bake a non-global adaptive pooling into a fixed kernel; these bin matrices
    are built from the input's shape in the graph instead.
    """
    out_h, out_w = _pair(output_size)
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
    j = torch.arange(size_in, device=like.device)
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


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
