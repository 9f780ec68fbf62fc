"""Split a model at a target layer into a gradient-free trunk and a differentiable head.

    x ──trunk──▶ (A, *extras) ──head──▶ output

``trunk`` holds every operation that does not depend on the target's output ``A``; ``head``
holds every operation that does. Values computed before ``A`` that the head still needs (a skip
connection crossing the cut, the input itself) become the head's extra inputs, so running the
trunk under ``torch.no_grad()`` leaves dScore/dA unchanged.

Three ways to build the split, tried in order:

1. ``"fx"``: symbolic tracing with torchvision's node-path tracer (it knows torchvision's leaf
   modules); trunk and head are ``torch.fx.GraphModule`` s sharing the model's own submodules.
2. ``"export"``: ``torch.export`` (handles shape-dependent Python control flow); the graph is
   frozen in the train/eval mode of the moment it was built.
3. ``"hook"``: a forward hook on the target module replaces its output by a leaf that requires
   grad and switches autograd on for the rest of the forward; no backward hooks.

A graph that traces but cannot be split (its shape propagation fails) gives way to the next
tracer (:mod:`cam_engine.model` drives the order). A ``torch.export`` head rebuilds the model's
output structure (a Hugging Face ``ModelOutput``) from its flat outputs.

Tracing is serialised by :data:`TRACE_LOCK` and leaves other threads' plain ``model(x)`` calls
alone (see :func:`tracing`); a ``HookCapture`` may run in several threads at once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torchvision
from torch import Tensor, nn
from torch.fx import _symbolic_trace
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree
from torchvision.models.feature_extraction import NodePathTracer

from .layers import unknown_layer_error

__all__ = [
    "Graph",
    "Split",
    "TRACE_LOCK",
    "trace",
    "tracing",
    "split",
    "find_module_output",
    "module_dicts",
]

#: held while this process traces a model with torch.fx or torch.export (see :func:`tracing`)
TRACE_LOCK = threading.RLock()


class _ThisThreadPatcher(_symbolic_trace._Patcher):
    """fx's patcher, except that what it patches on a class is seen by the patching thread only.

    ``fx.Tracer.trace`` (which ``torch.export`` runs too, through ``make_fx``) swaps
    ``nn.Module.__call__`` and ``nn.Module.__getattr__`` on the class, so for every thread: a
    plain ``m(x)`` running elsewhere meanwhile would be recorded into the graph being traced, read
    its parameters as proxies, or fail ("module is not installed as a submodule"). Here each
    patched method calls the tracer's version in the thread that patched it and what the class
    had before in every other thread. The module-level functions fx also patches (``math.sqrt``,
    ``torch.fx.wrap`` targets) behave differently only when given proxies, which other threads
    never pass.
    """

    def patch_method(
        self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True
    ) -> None:
        tracing_thread, previous = threading.get_ident(), getattr(cls, name)

        @functools.wraps(new_fn)
        def in_tracing_thread_only(*args: Any, **kwargs: Any) -> Any:
            patched = threading.get_ident() == tracing_thread
            return (new_fn if patched else previous)(*args, **kwargs)

        super().patch_method(cls, name, in_tracing_thread_only, deduplicate)


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """Hold :data:`TRACE_LOCK` and confine the tracers' class patches to this thread.

    torch.fx finds its patcher class by its module-level name ``_Patcher`` each time it traces;
    for as long as this context lasts, that name is :class:`_ThisThreadPatcher`. Re-entrant.
    """
    with TRACE_LOCK:
        saved = _symbolic_trace._Patcher
        _symbolic_trace._Patcher = _ThisThreadPatcher
        try:
            yield
        finally:
            _symbolic_trace._Patcher = saved


class _ModuleOutputTracer(NodePathTracer):
    """torchvision's ``NodePathTracer`` that also records the output node of every module call
    and each node's ``meta["nn_module_stack"]``, and traces into the leaf modules (torchvision's
    op blocks) that hold the module ``inside``."""

    def __init__(self, inside: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inside = inside
        self.module_outputs: dict[str, fx.Node] = {}
        self.module_calls: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        # an op block kept whole would hide the requested layer (features.18.0 in MobileNetV2):
        # FX's own rule decides for it instead (torch.nn modules stay leaves)
        holds = self.inside is not None and self.inside.startswith(module_qualname + ".")
        if holds and isinstance(m, tuple(self.leaf_modules)):
            return fx.Tracer.is_leaf_module(self, m, module_qualname)
        return super().is_leaf_module(m, module_qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        calls = self.module_calls[name] = self.module_calls.get(name, 0) + 1
        # the modules each node is computed in, as fx's own tracer records them (torchvision's
        # call_module does not): the default layer skips what attention modules compute
        key = f"{name}@{calls}"
        self.module_stack[key] = (name, type(m))
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self.module_stack.pop(key, None)
        if isinstance(out, fx.Proxy):
            self.module_outputs[name] = out.node
        return out


def _tracer_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {"autowrap_modules": (math, torchvision.ops)}
    try:  # the leaf modules torchvision's own feature extractor uses (StochasticDepth, ...)
        from torchvision.models.feature_extraction import _get_leaf_modules_for_ops

        kwargs["leaf_modules"] = _get_leaf_modules_for_ops()
    except ImportError:  # pragma: no cover - older torchvision
        pass
    try:  # timm's FX helpers, when timm is installed
        from timm.layers import _fx as timm_fx

        kwargs["leaf_modules"] = [*kwargs.get("leaf_modules", []), *timm_fx._leaf_modules]
        kwargs["autowrap_functions"] = tuple(timm_fx._autowrap_functions)
    except (ImportError, AttributeError):
        pass
    return kwargs


@dataclass
class Graph:
    """A traced model: its graph module and where each name's value is computed.

    Attributes:
        module: the traced ``fx.GraphModule`` (shares the model's submodules and parameters).
        kind: ``"fx"`` or ``"export"``.
        names: every accepted target name -> the node computing it (dotted module names, FX node
            names and torchvision's qualified node names).
        module_names: the dotted names of the modules whose output is a node of the graph.
        repeated: modules that run more than once per forward -> the names of each call.
        structured: modules whose output holds their node's value in a structure (a Hugging
            Face encoder's ``ModelOutput``): accepted names, but not the names given to a map.
    """

    module: fx.GraphModule
    kind: str
    names: dict[str, fx.Node]
    module_names: list[str] = field(default_factory=list)
    repeated: dict[str, list[str]] = field(default_factory=dict)
    structured: set[str] = field(default_factory=set)

    def node(self, name: str) -> fx.Node:
        if name not in self.names:
            raise unknown_layer_error(name, self.module_names, list(self.names))
        if name in self.repeated:
            warnings.warn(
                f"module {name!r} runs {len(self.repeated[name])} times per forward; using its "
                f"first call. Name one call explicitly: {', '.join(self.repeated[name])}",
                stacklevel=4,
            )
        return self.names[name]

    def name_of(self, node: fx.Node) -> str:
        """The outermost module name computing ``node``, else its FX node name.

        A module returning the value as a tensor comes first: that is the module hooks
        (pytorch-grad-cam's) can take (``resnet.encoder.stages.3``, not ``resnet.encoder``).
        """
        modules = [m for m in self.module_names if self.names[m] is node]
        return min(modules, key=lambda m: (m in self.structured, m.count(".")), default=node.name)


def _defaults(model: nn.Module) -> dict[str, Any]:
    """The parameters of ``model.forward`` after the first that have defaults, bound to them: the
    engine calls the model with its input alone, so optional inputs take their defaults (an
    ``x2=None`` branch is traced as not taken)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and p.default is not p.empty}


def _trace_fx(model: nn.Module, inside: str | None) -> Graph:
    tracer = _ModuleOutputTracer(inside, **_tracer_kwargs())
    graph = tracer.trace(model, concrete_args=_defaults(model) or None)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    # node objects were copied into gm's graph by name; map them back.
    by_name = {n.name: n for n in gm.graph.nodes}
    names: dict[str, fx.Node] = {}
    for node, qualname in tracer.node_to_qualname.items():
        if node.name in by_name:
            names.setdefault(qualname, by_name[node.name])
    names.update({n.name: n for n in gm.graph.nodes if n.op not in ("placeholder", "output")})
    module_names, repeated = [], {}
    for module_name, node in tracer.module_outputs.items():
        calls = tracer.module_calls[module_name]
        if calls > 1:  # torchvision names the calls "name", "name_1", ...
            repeated[module_name] = [module_name] + [f"{module_name}_{i}" for i in range(1, calls)]
        elif node.name in by_name:
            names[module_name] = by_name[node.name]
            module_names.append(module_name)
    return Graph(gm, "fx", names, module_names, repeated)


def _module_tree_copy(model: nn.Module) -> nn.Module:
    """``model`` with each module object copied, its parameters, buffers and hooks shared (a
    forward hook added to a copy stays off ``model``).

    Non-strict ``torch.export`` swaps a module's parameters and buffers for fake tensors while
    it traces; on a copy of the module tree, other threads running ``model`` keep the real ones.
    """
    copies: dict[int, nn.Module] = {}

    def copy_tree(module: nn.Module) -> nn.Module:
        if id(module) not in copies:  # a module reused in several places stays one module
            twin = copies[id(module)] = copy.copy(module)
            twin._parameters = dict(module._parameters)
            twin._buffers = dict(module._buffers)
            twin._forward_hooks = type(module._forward_hooks)(module._forward_hooks)
            twin._modules = {
                name: None if child is None else copy_tree(child)
                for name, child in module._modules.items()
            }
        return copies[id(module)]

    return copy_tree(model)


def _trace_export(model: nn.Module, example: Tensor) -> Graph:
    batch = torch.export.Dim("batch", min=1)
    twin = _module_tree_copy(model)
    with _tensor_returning(twin) as returns_tensor:
        program = torch.export.export(twin, (example,), dynamic_shapes=({0: batch},), strict=False)
    gm = program.module()
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    members: dict[str, set[fx.Node]] = {}
    for node in nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            members.setdefault(path, set()).add(node)
    names: dict[str, fx.Node] = {n.name: n for n in nodes}
    module_names = []
    for path, inside in members.items():
        # a module's output: its last node whose value is used outside the module
        escaping = [n for n in nodes if n in inside and any(u not in inside for u in n.users)]
        if path and escaping:
            names[path] = escaping[-1]
            module_names.append(path)
    structured = {path for path in module_names if path not in returns_tensor}
    return Graph(gm, "export", names, module_names, structured=structured)


@contextlib.contextmanager
def _tensor_returning(twin: nn.Module) -> Iterator[set[str]]:
    """The names of ``twin``'s modules whose call returned a tensor, filled as it runs.

    ``twin`` is a :func:`_module_tree_copy`: the recording hooks go on its own hook tables.
    """
    paths: dict[nn.Module, list[str]] = {}
    for path, module in twin.named_modules(remove_duplicate=False):
        paths.setdefault(module, []).append(path)  # a module used in several places: each name
    found: set[str] = set()

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            found.update(paths[module])

    handles = [module.register_forward_hook(record) for module in paths]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


#: the tracers :func:`trace` tries, in order
TRACERS = ("fx", "export")


def module_dicts(model: nn.Module) -> Iterator[dict]:
    """The dicts ``model``'s modules keep as public attributes of their own: where a module
    memoises values (timm LeViT / EfficientFormer's ``attention_bias_cache``). Parameters,
    buffers, submodules and hooks (the ``_``-prefixed tables) are not among them."""
    for module in model.modules():
        for name, table in vars(module).items():
            if not name.startswith("_") and isinstance(table, dict):
                yield table


@contextlib.contextmanager
def _model_state_kept(model: nn.Module) -> Iterator[None]:
    """Put back the contents of the modules' own dicts after tracing.

    Modules that memoise a value on their first forward (timm LeViT / EfficientFormer's
    ``attention_bias_cache``) would otherwise keep the tracer's proxy or fake tensor: the next
    trace or the user's next ``model(x)`` then reads a value of a graph that no longer exists.
    """
    saved = [(table, dict(table)) for table in module_dicts(model)]
    try:
        yield
    finally:
        for table, contents in saved:
            table.clear()
            table.update(contents)


def trace(
    model: nn.Module,
    example: Tensor | None = None,
    inside: str | None = None,
    tracers: Iterable[str] = TRACERS,
) -> tuple[Graph | None, list[str]]:
    """Trace ``model`` with the first of ``tracers`` that succeeds: ``"fx"``, ``"export"``
    (which needs ``example``).

    FX keeps torchvision's op blocks (``Conv2dNormActivation``, ``MLP``, ...) whole, except
    those holding the module named ``inside`` (a requested target layer), which it traces into.

    Runs inside :func:`tracing`: one trace at a time in the process, and other threads may keep
    calling ``model`` meanwhile. The model is left as it was (see :func:`_model_state_kept`).

    Returns:
        the graph (``None`` when no tracer succeeds) and one line per failed attempt.
    """
    failures = []
    with tracing(), _model_state_kept(model):
        for tracer in tracers:
            if tracer == "fx":
                try:
                    return _trace_fx(model, inside), failures
                except Exception as exc:  # any tracing error means "use the next strategy"
                    failures.append(f"torch.fx: {type(exc).__name__}: {first_line(exc)}")
            elif tracer == "export" and example is not None:
                try:
                    # a failed export prints its partial graph to stderr; the fallback is expected
                    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                        warnings.simplefilter("ignore")
                        return _trace_export(model, example), failures
                except Exception as exc:
                    failures.append(f"torch.export: {type(exc).__name__}: {first_line(exc)}")
    return None, failures


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


@dataclass
class Split:
    """The model cut at one node.

    Attributes:
        trunk: ``x -> (A, *extras)``; run it under ``torch.no_grad()``.
        head: ``(A, *extras) -> output``, the model's own output structure.
        target: the graph node computing ``A``.
        extras: names of the trunk values the head needs besides ``A``.
    """

    trunk: fx.GraphModule
    head: fx.GraphModule
    target: fx.Node
    extras: list[str]


def _descendants(nodes: Iterable[fx.Node], root: fx.Node) -> set[fx.Node]:
    found = {root}
    for node in nodes:
        if any(inp in found for inp in node.all_input_nodes):
            found.add(node)
    found.discard(root)
    return found


def split(graph: Graph, target: fx.Node) -> Split:
    """Cut ``graph`` at ``target``: the head is everything downstream of it, the trunk the rest.

    The trunk keeps every node that is not downstream of the target (none is eliminated, so
    in-place operations keep their effects); the head gets copies of the parameters it reads.
    """
    nodes = list(graph.module.graph.nodes)
    head_nodes = _descendants(nodes, target)
    output = next(n for n in nodes if n.op == "output")
    if output not in head_nodes:
        raise ValueError(f"the model's output does not depend on {target.name!r}")
    crossing = [
        n
        for n in nodes
        if n not in head_nodes
        and n is not target
        and n.op != "get_attr"
        and any(u in head_nodes for u in n.users)
    ]

    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node not in head_nodes and node.op != "output":
            env[node] = trunk_graph.node_copy(node, lambda n: env[n])
    trunk_graph.output((env[target], *(env[n] for n in crossing)))

    head_graph = fx.Graph()
    env = {target: head_graph.placeholder("features")}
    for node in crossing:
        env[node] = head_graph.placeholder(node.name)
    for node in nodes:
        if node in head_nodes:
            for inp in node.all_input_nodes:
                if inp not in env and inp.op == "get_attr":
                    env[inp] = head_graph.node_copy(inp)
            env[node] = head_graph.node_copy(node, lambda n: env[n])

    root = graph.module
    out_spec = getattr(root, "_out_spec", None)
    if out_spec is not None:  # torch.export's flat outputs: rebuild the model's own structure
        names = [n.name for n in head_graph.nodes if n.op == "placeholder"]
        in_spec = pytree.tree_structure(tuple(names))
        head_graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))
    return Split(
        trunk=fx.GraphModule(root, trunk_graph, "Trunk"),
        head=fx.GraphModule(root, head_graph, "Head"),
        target=target,
        extras=[n.name for n in crossing],
    )


def find_module_output(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; ``ValueError`` with close candidates when there is none."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise unknown_layer_error(name, [m for m in modules if m], [])
    return modules[name]


class HookCapture:
    """Last-resort split: a forward hook on the target module, no backward hooks.

    During :meth:`explain_forward` autograd is off until the target module returns; the hook then
    replaces its output by a leaf ``A`` that requires grad and turns autograd on, so the rest of the
    forward (the head) is recorded and ``torch.autograd.grad(scores, A)`` stops at ``A``.

    Several threads may run it at once: each call's hook, although registered on the shared
    module, acts on that module's runs in the calling thread only (grad mode is per thread too).
    """

    def __init__(self, model: nn.Module, module: nn.Module) -> None:
        self.model = model
        self.module = module

    def run(self, x: Tensor, grad_head: bool) -> tuple[Tensor, Any]:
        """Returns ``(A, output)``; with ``grad_head``, ``A`` is a leaf requiring grad."""
        captured: list[Tensor] = []
        caller = threading.get_ident()

        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
            if threading.get_ident() != caller:
                return None
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"the target layer returns {type(output).__name__}, not a tensor; "
                    "pick a layer whose output is the feature map"
                )
            if not grad_head:
                captured.append(output)
                return None
            features = output.detach().requires_grad_(True)
            captured.append(features)
            torch.set_grad_enabled(True)
            return features.clone()  # in-place ops downstream must not touch A

        handle = self.module.register_forward_hook(hook)
        previous = torch.is_grad_enabled()
        try:
            if grad_head:
                torch.set_grad_enabled(False)
            output = self.model(x)
        finally:
            handle.remove()
            torch.set_grad_enabled(previous)
        if len(captured) != 1:
            raise ValueError(
                f"the target layer ran {len(captured)} times in one forward pass; "
                "pick a layer that runs exactly once"
            )
        return captured[0], output
