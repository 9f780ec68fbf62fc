"""``wrap``: a model rebuilt to return ``(logits, features)`` without hooks."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch._dynamo.utils import deepcopy_to_fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.profiler import record_function

from .cache import state_key
from .graph import (
    TRACERS,
    Graph,
    HookCapture,
    Split,
    find_module_output,
    first_line,
    split,
    trace,
)
from .heads import GapLinear, find_gap_linear
from .layers import default_target, layer_name, map_fits

__all__ = ["CAMModel", "SplitRunner", "wrap", "select_output"]

OutputSelector = int | str | Callable[[Any], Tensor] | None
#: ``CAMModel(compile=...)``: ``False``, ``True`` (torch.compile defaults) or its keyword options
CompileOptions = bool | dict[str, Any]
#: ``torch.compile`` modes that replay CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: splits a CAMModel keeps (one per mode, device and dtype; per input shape for torch.export)
SPLITS_KEPT = 8


def select_output(output: Any, selector: OutputSelector = None) -> Tensor:
    """The logits inside a model's output.

    Args:
        output: a tensor, or a tuple / list / dict / named tuple / dataclass of them.
        selector: an index, a key (or attribute) name, a callable, or ``None`` for the first
            tensor found (depth-first).
    """
    if callable(selector):
        found = selector(output)
    elif selector is None:
        found = _first_tensor(output)
    elif isinstance(selector, str):
        getter = output.get if isinstance(output, dict) else lambda key: getattr(output, key, None)
        found = getter(selector)
    else:
        found = output[selector]
    if not isinstance(found, Tensor):
        raise ValueError(
            f"could not find the logits in the model's output ({type(output).__name__}); "
            "pass output= an index, a key or a callable"
        )
    return found


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        items = list(output.values())
    elif isinstance(output, tuple | list):
        items = list(output)
    elif hasattr(output, "__dataclass_fields__"):
        items = [getattr(output, f) for f in output.__dataclass_fields__]
    else:
        return None
    return next((t for t in map(_first_tensor, items) if t is not None), None)


def _first_conv_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)), None)
    return conv.in_channels if conv is not None else 3


def _has_inplace(head: fx.GraphModule) -> bool:
    for node in head.graph.nodes:
        if node.kwargs.get("inplace") is True:
            return True
        if node.op == "call_method" and str(node.target).endswith("_"):
            return True
        if node.op == "call_module" and getattr(head.get_submodule(node.target), "inplace", False):
            return True
    return False


@dataclass
class SplitRunner:
    """One built split of a model (for one mode, device and dtype; one input shape for
    ``torch.export``) and the only code that runs it.

    Attributes:
        kind: ``"fx"``, ``"export"`` or ``"hook"``.
        target_layer: the resolved target name.
        split: the trunk and head graph modules (``None`` for the hook capture).
        hook: the forward-hook capture (``None`` for traced splits).
        gap: the head's closed form when it is global-average-pool -> linear, else ``None``.
        head_inplace: the head changes its input in place (it gets a copy of the map).
        notes: why earlier split strategies were not used.
        input_shape: (C, H, W) an export graph is exact at (``None`` for the others).
        inference_trunk: the trunk run without autograd (compiled), ``None``: ``split.trunk``.
        channels_last: without autograd, the trunk gets channels-last copies of 4-D images.
        map_checked: whether the map's grid was checked against an input's aspect ratio.
    """

    kind: str
    target_layer: str
    split: Split | None = None
    hook: HookCapture | None = None
    gap: GapLinear | None = None
    head_inplace: bool = False
    notes: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    inference_trunk: Callable[[Tensor], tuple] | None = None
    channels_last: bool = False
    map_checked: bool = False

    def check_map(self, features: Tensor, image_size: tuple[int, ...]) -> None:
        """Warn, on the first call only, when a (B, C, h, w) map's grid does not have the
        image's aspect ratio in either layout: its heatmaps would be that grid stretched (a node
        inside attention, (B, heads, T, d), is no feature map)."""
        if self.map_checked:
            return
        self.map_checked = True
        shape = tuple(features.shape)
        # a 1x1 map (a small input's last stage) is one value per channel: nothing to stretch
        single = len(shape) == 4 and shape[2] * shape[3] == 1
        if len(shape) == 4 and not single and not map_fits(shape, tuple(image_size)):
            warnings.warn(
                f"the target layer {self.target_layer!r} outputs {shape}, whose "
                f"grid does not have the input's aspect ratio {tuple(image_size)}: its heatmaps "
                "are that grid stretched over the image. Pick a layer that outputs a spatial "
                "map (target_layer=None does), or pass reshape= a callable",
                stacklevel=5,
            )

    def trunk(self, x: Tensor) -> tuple:
        """``(features, *extras)`` of the split's trunk (profiled as its stage).

        When grad is disabled, the trunk is the compiled one (if any) and, with
        :attr:`channels_last`, runs on a channels-last copy of 4-D images; its 4-D outputs are
        then made contiguous again, so callers see the layout they would without it.
        """
        with record_function("trunk forward (no grad)"):
            if torch.is_grad_enabled():
                return self.split.trunk(x)
            trunk = self.split.trunk if self.inference_trunk is None else self.inference_trunk
            if not (self.channels_last and x.ndim == 4):
                return trunk(x)
            outputs = trunk(x.contiguous(memory_format=torch.channels_last))
            return tuple(
                t.contiguous() if isinstance(t, Tensor) and t.ndim == 4 else t for t in outputs
            )

    def head(self, features: Tensor, *extras: Any) -> Any:
        """The model's raw output from the target map (B, *F) and the trunk's extras (profiled
        as its stage); a head that works in place gets a copy of the map."""
        with record_function("head forward"):
            return self.split.head(features.clone() if self.head_inplace else features, *extras)

    def capture(self, x: Tensor, grad_head: bool) -> tuple[Tensor, Any]:
        """``(features, raw output)`` of the hook capture (profiled as its stage)."""
        with record_function("forward (hook capture)"):
            return self.hook.run(x, grad_head=grad_head)


class CAMModel(nn.Module):
    """``model`` split at ``target_layer``: ``forward(x) -> (logits, features)``, no hooks.

    The split is built with torch.fx, else ``torch.export``, else a forward-hook capture
    (:attr:`split_kind` says which; :attr:`notes` why an earlier way failed). It is rebuilt when
    the model's train/eval mode, device or dtype changes, since traced graphs depend on them; the
    last :data:`SPLITS_KEPT` splits are kept. The wrapped model is never modified: its mode,
    modules and parameters stay as the caller set them.

    Threads may call one CAMModel at once: a split is built by one of them while the others wait
    for it, and a plain ``model(x)`` elsewhere is safe while it is traced (see
    :func:`cam_engine.graph.tracing`).

    Args:
        model: a classifier.
        target_layer: a dotted module name (``"layer4"``, ``"features.35"``), an FX node name or
            a module of ``model`` (``model.layer4[-1]``, named by identity); ``None`` picks
            the map users mean (see :func:`cam_engine.layers.default_target`): the last spatial
            feature map before global pooling, or, for vision transformers, the first norm of
            the last block.
        output: where the logits are in the model's output (see :func:`select_output`).
        input_size: (H, W) of the example input used to choose the default layer and for
            ``torch.export``.
        compile: run the trunk through ``torch.compile`` whenever it runs without autograd (in
            :meth:`explain_forward`, and in :meth:`forward` under ``torch.no_grad()``): ``True``
            for its defaults, or a dict of its keyword arguments (``{"mode":
            "reduce-overhead"}`` for CUDA graphs, whose outputs are then copied out). The head,
            which needs autograd, stays eager. Compiling happens on the first call.
        channels_last: run the trunk without autograd on a channels-last copy of 4-D images
            (oneDNN and cuDNN pick faster convolution kernels for that layout): ``None`` (the
            default) does so on the CPU, where Grad-CAM measured 1.02x to 1.53x the images/s of
            torchvision's CNNs (README, "Python API"); ``True`` on every device; ``False``
            never. A trunk that cannot take that layout (a ``view`` that needs contiguous
            strides) keeps its input as it is; :attr:`notes` says so. Maps are unchanged up to
            float rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        *,
        output: OutputSelector = None,
        input_size: tuple[int, int] = (224, 224),
        compile: CompileOptions = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
        if not isinstance(compile, bool | dict):
            raise ValueError(
                f"compile must be a bool or a dict of torch.compile options, got {compile!r}"
            )
        if channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be None, True or False, got {channels_last!r}")
        self.model = model
        self.output = output
        self.input_size = tuple(input_size)
        #: keyword arguments of ``torch.compile`` for the trunk; ``None``: not compiled
        self.compile_options = None if compile is False else {} if compile is True else compile
        #: ``None``: channels-last trunk input on the CPU only; ``True``: everywhere; ``False``
        self.channels_last = channels_last
        target_layer = layer_name(model, target_layer)
        self._requested = target_layer
        self._built: OrderedDict[tuple, SplitRunner] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        built = self.current()
        self._requested = built.target_layer if built.kind != "hook" else target_layer

    @property
    def split_kind(self) -> str:
        """``"fx"``, ``"export"`` or ``"hook"``."""
        return self.current().kind

    @property
    def target_layer(self) -> str:
        """The resolved target name."""
        return self.current().target_layer

    @property
    def notes(self) -> list[str]:
        """Why earlier split strategies were not used (empty for torch.fx)."""
        return self.current().notes

    @property
    def gap_linear(self) -> GapLinear | None:
        """The head's closed form when it is global-average-pool -> linear."""
        return self.current().gap

    def current(self, x: Tensor | None = None) -> SplitRunner:
        """The :class:`SplitRunner` for the model's current mode, device and dtype (built on
        first use): what runs the split, for code that needs more than :meth:`forward`.

        ``torch.export`` graphs bake shape-dependent control flow in, so with ``x`` given they
        are re-exported per input shape (the batch size stays dynamic).
        """
        key = state_key(self.model)
        built = self._cached(key)
        if built.kind == "export" and x is not None and tuple(x.shape[1:]) != built.input_shape:
            built = self._cached((*key, tuple(x.shape[1:])), tuple(x.shape[1:]))
        return built

    def _cached(self, key: tuple, shape: tuple[int, ...] | None = None) -> SplitRunner:
        """The split under ``key``, built for an example of ``shape`` (C, H, W) when missing.

        A build holds the lock, so a thread wanting the same split waits for it instead of
        building it again or seeing it half-built.
        """
        with self._lock:
            if key in self._built:
                self._built.move_to_end(key)
                return self._built[key]
            built = self._built[key] = self._build(self._example(shape))
            if len(self._built) > SPLITS_KEPT:
                self._built.popitem(last=False)
            return built

    def __getstate__(self) -> dict[str, Any]:
        # a lock can be neither copied nor pickled: each copy makes its own
        return {k: v for k, v in super().__getstate__().items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def _example(self, shape: tuple[int, ...] | None = None) -> Tensor:
        tensor = next(self.model.parameters(), None)
        kwargs = {"device": tensor.device, "dtype": tensor.dtype} if tensor is not None else {}
        shape = shape or (_first_conv_channels(self.model), *self.input_size)
        return torch.zeros(2, *shape, **kwargs)

    def _build(self, example: Tensor) -> SplitRunner:
        graph, notes = trace(self.model, example, inside=self._requested)
        while graph is not None:
            try:
                node = self._target_node(graph, example)
                parts = split(graph, node)
                break
            except ValueError:  # an unknown name, a layer the output does not use: the user's
                raise
            except Exception as exc:  # shape propagation failed on this graph: the next way
                notes.append(f"{graph.kind} split: {type(exc).__name__}: {first_line(exc)}")
                later = TRACERS[TRACERS.index(graph.kind) + 1 :]
                graph, failures = trace(self.model, example, inside=self._requested, tracers=later)
                notes += failures
        if graph is not None:
            options = self.compile_options
            channels_last, refusal = self._trunk_channels_last(parts.trunk, example)
            return SplitRunner(
                kind=graph.kind,
                target_layer=graph.name_of(node),
                split=parts,
                gap=find_gap_linear(parts.head),
                head_inplace=_has_inplace(parts.head),
                notes=notes + refusal,
                input_shape=tuple(example.shape[1:]) if graph.kind == "export" else None,
                inference_trunk=None if options is None else _compiled(parts.trunk, options),
                channels_last=channels_last,
            )
        if self._requested is None:
            raise ValueError(
                "the model could not be traced, so no default target layer can be chosen; pass "
                "target_layer= a module name. Tracing failed with: " + "; ".join(notes)
            )
        module = find_module_output(self.model, self._requested)
        warnings.warn(
            "model could not be traced (" + "; ".join(notes) + "); using a forward-hook capture "
            f"of {self._requested!r} (no backward hooks, gradients still by autograd.grad)",
            stacklevel=3,
        )
        if self.compile_options is not None:
            notes = [*notes, "compile= is ignored: the hook capture runs eagerly"]
        capture = HookCapture(self.model, module)
        return SplitRunner("hook", self._requested, hook=capture, notes=notes)

    def _trunk_channels_last(self, trunk: fx.GraphModule, example: Tensor) -> tuple[bool, list]:
        """Whether ``trunk`` gets channels-last images, and a note when it cannot take them."""
        wanted = self.channels_last
        if wanted is None:
            wanted = example.device.type == "cpu"
        if not wanted or example.ndim != 4:
            return False, []
        failure = _channels_last_failure(trunk, example)
        if failure is None:
            return True, []
        note = f"channels-last input is off: the trunk failed on one ({failure})"
        if self.channels_last:
            warnings.warn(note, stacklevel=4)
        return False, [note]

    def _target_node(self, graph: Graph, example: Tensor) -> fx.Node:
        if self._requested is not None:
            return graph.node(self._requested)
        if graph.kind == "fx":
            _propagate_shapes(graph.module, example)
        modules = dict(self.model.named_modules())
        norms = [  # LayerNorm, and the norms named so (timm ResMLP's Affine norm1 / norm2)
            (name, graph.names[name])
            for name in graph.module_names
            if isinstance(modules.get(name), nn.LayerNorm) or "norm" in name.rpartition(".")[2]
        ]
        return default_target(graph.module, norms, tuple(example.shape[2:4]))

    def predict(self, x: Tensor) -> Tensor:
        """The selected model output (the logits) for ``x``, without autograd."""
        with torch.no_grad():
            return self(x)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(logits (B, N), features)``; features as the target layer outputs them."""
        runner = self.current(x)
        if runner.hook is not None:
            features, output = runner.capture(x, grad_head=False)
            return select_output(output, self.output), features
        features, *extras = runner.trunk(x)
        return select_output(runner.head(features, *extras), self.output), features

    def explain_forward(
        self, x: Tensor, closed_form: bool = True
    ) -> tuple[Tensor, Tensor, GapLinear | None]:
        """Trunk without autograd, head with it (or not at all, in closed form).

        Returns:
            ``(features, logits, gap)``. ``gap`` is the head's closed form when the head is
            global-average-pool -> linear at this map size and mode, else ``None``. With
            ``closed_form`` and a ``gap``, ``logits`` carry no graph; otherwise ``features`` is a
            leaf that requires grad and ``logits`` depend on it through the head only, so
            ``torch.autograd.grad(scores, features)`` stops there.
        """
        runner = self.current(x)
        if runner.hook is not None:
            features, output = runner.capture(x, grad_head=True)
            runner.check_map(features, x.shape[2:])
            return features, select_output(output, self.output), None
        with torch.no_grad():
            features, *extras = runner.trunk(x)
        runner.check_map(features, x.shape[2:])
        gap = runner.gap if runner.gap is not None and runner.gap.applies(features) else None
        needs_grad = gap is None or not closed_form
        if needs_grad:
            features = features.detach().requires_grad_(True)
        with torch.set_grad_enabled(needs_grad):
            output = runner.head(features, *extras)
        return features, select_output(output, self.output), gap


def _compiled(trunk: fx.GraphModule, options: dict[str, Any]) -> Callable[[Tensor], tuple]:
    """``torch.compile(trunk, **options)``; under CUDA graphs, with its outputs copied out.

    CUDA graphs write every replay's outputs into the same buffers, so a second trunk run in one
    explain call (or the next call) would overwrite the features still in use.
    """
    compiled = torch.compile(trunk, **options)
    if options.get("mode") not in CUDA_GRAPH_MODES:
        return compiled

    def replay(x: Tensor) -> tuple:
        return tuple(t.clone() if isinstance(t, Tensor) else t for t in compiled(x))

    return replay


class _HooklessInterpreter(fx.Interpreter):
    """Runs a graph calling its modules' ``forward`` directly: the model's hooks do not fire."""

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        return self.fetch_attr(target).forward(*args, **kwargs)


@contextlib.contextmanager
def _fake_tensors(device: torch.device) -> Iterator[FakeTensorMode]:
    """A fake-tensor mode with autocast off: autocast caches its casts of the real weights for
    the rest of the caller's autocast region, and a cached fake cast would poison real calls."""
    with contextlib.ExitStack() as stack:
        if torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        yield FakeTensorMode(allow_non_fake_inputs=True)


def _channels_last_failure(trunk: fx.GraphModule, example: Tensor) -> str | None:
    """Why ``trunk`` fails on a channels-last ``example``, or ``None``.

    It runs a fake-tensor copy of the trunk (as ``ShapeProp`` does), so that nothing of the
    model changes (train-mode BatchNorm counts its batches) and none of its hooks fire.
    """
    try:
        with _fake_tensors(example.device) as mode:
            fake_trunk = deepcopy_to_fake_tensor(trunk, mode)
            with mode:
                fake = mode.from_tensor(example.contiguous(memory_format=torch.channels_last))
                _HooklessInterpreter(fake_trunk).run(fake)
    except Exception as exc:  # a view needing contiguous strides, an op without a fake kernel
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


def _propagate_shapes(gm: fx.GraphModule, example: Tensor) -> None:
    """Annotate ``gm``'s nodes with ``meta["tensor_meta"]``, on fake tensors when possible."""
    try:
        with _fake_tensors(example.device) as mode:
            ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(example))
    except Exception:  # some ops have no fake kernel: pay for one real forward instead
        with torch.no_grad():
            ShapeProp(gm).propagate(example)


def wrap(
    model: nn.Module,
    target_layer: str | nn.Module | None = None,
    *,
    output: OutputSelector = None,
    input_size: tuple[int, int] = (224, 224),
    compile: CompileOptions = False,
    channels_last: bool | None = None,
) -> CAMModel:
    """Rebuild ``model`` so that ``forward(x)`` returns ``(logits, features)`` without hooks.

    See :class:`CAMModel` for the arguments.
    """
    return CAMModel(
        model,
        target_layer,
        output=output,
        input_size=input_size,
        compile=compile,
        channels_last=channels_last,
    )
