"""Thread safety: tracing while other threads run the model, and splits called from threads."""

from __future__ import annotations

import copy
import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from conftest import images
from torch import nn

import cam_engine as ce
from cam_engine import model as model_module

WAIT_S = 10  # a wait this long means a deadlock: fail instead of hanging


class Rendezvous(nn.Module):
    """Identity. Once armed, a traced forward (its input a proxy or a fake tensor) stops until
    :func:`run_plainly` has run the model once, so that call surely falls inside the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.tracing, self.resume = threading.Event(), threading.Event()
        self.rounds = 0  # plain calls made inside a trace

    def forward(self, x):
        if self.armed and type(x) is not torch.Tensor:
            self.resume.clear()
            self.tracing.set()
            if not self.resume.wait(WAIT_S):
                raise TimeoutError("no plain call came")
        return x


class Gate(nn.Module):
    """Identity; with a barrier set, each forward waits there for another thread's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier: threading.Barrier | None = None

    def forward(self, x):
        if self.barrier is not None:
            self.barrier.wait()
        return x


class TinyNet(nn.Module):
    """conv -> (gate) -> conv "body" -> max-pool -> linear; torch.fx traces it."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = gate
        self.body = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def branch(self, x):
        return x

    def features(self, x):
        return self.body(self.gate(self.branch(self.stem(x).relu())))

    def head(self, a):
        return self.fc(a.relu().amax((2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


class ShapeBranchNet(TinyNet):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def branch(self, x):
        return F.max_pool2d(x, 2) if x.shape[-1] > 12 else x


class DataBranchNet(TinyNet):
    """Control flow on a value: neither tracer works, the forward-hook capture does."""

    def branch(self, x):
        return x * 2 if x.mean() > 0 else x


def manual_gradcam(net: TinyNet, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by hand: (B, K) classes -> (B, K, h, w)."""
    a = net.features(x).detach().requires_grad_(True)
    scores = net.head(a)
    maps = []
    for k in range(classes.shape[1]):
        score = scores.gather(1, classes[:, k : k + 1]).sum()
        (g,) = torch.autograd.grad(score, a, retain_graph=True)
        maps.append((g.mean((2, 3), keepdim=True) * a).sum(1).relu().detach())
    return torch.stack(maps, 1)


def assert_gradcam(res: ce.CAMResult, net: TinyNet, x: torch.Tensor) -> None:
    torch.testing.assert_close(res.cams, manual_gradcam(net, x, res.classes), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.logits, net(x))


def run_plainly(net: TinyNet, x: torch.Tensor, stop: threading.Event, outputs: list) -> None:
    """Call ``net(x)`` until ``stop``; each output (or exception) goes to ``outputs``."""
    meet = net.gate
    while not stop.is_set():
        meeting = meet.tracing.is_set()  # then this whole call runs while the tracer waits
        try:
            with torch.no_grad():
                outputs.append(net(x))
        except Exception as exc:
            outputs.append(exc)
        if meeting:
            meet.rounds += 1
            meet.tracing.clear()
            meet.resume.set()
        stop.wait(1e-3)  # leave the tracing thread most of the GIL


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def assert_same_result(got: ce.CAMResult, expected: ce.CAMResult) -> None:
    torch.testing.assert_close(got.classes, expected.classes)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.cams, expected.cams)


@pytest.mark.parametrize("net_cls,kind,builds", [(TinyNet, "fx", 3), (ShapeBranchNet, "export", 1)])
def test_plain_calls_in_another_thread_are_untouched_by_builds(net_cls, kind, builds):
    torch.manual_seed(0)
    net = net_cls(Rendezvous()).eval()
    x, smaller = images(2, 16, dtype=torch.float32), images(2, 12, dtype=torch.float32)
    with torch.no_grad():
        plain = net(x)
    net.gate.armed = True
    stop, outputs = threading.Event(), []
    runner = threading.Thread(target=run_plainly, args=(net, x, stop, outputs), daemon=True)
    runner.start()
    try:
        results = []
        for _ in range(builds):
            engine = ce.CAMEngine(net, "body", input_size=(16, 16))
            results += [(x, engine(x)), (smaller, engine(smaller))]
    finally:
        stop.set()
        runner.join(WAIT_S)
    assert engine.split_kind == kind
    traces = {"fx": builds, "export": 2 * builds}[kind]  # export: rebuilt at 12 px
    assert net.gate.rounds >= traces, "the plain calls did not meet every trace"
    # torch.export turns oneDNN off process-wide while it traces: equal up to float rounding
    failed = [o for o in outputs if not isinstance(o, torch.Tensor) or not close(o, plain)]
    assert not failed, f"{len(failed)} of {len(outputs)} plain calls failed: {failed[:3]}"
    net.gate.armed = False
    for images_, res in results:
        assert_gradcam(res, net, images_)


def test_hook_split_runs_in_two_threads_at_once():
    torch.manual_seed(0)
    net = DataBranchNet(Gate()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook fallback warns
        engine = ce.CAMEngine(net, "body", input_size=(16, 16))
    assert engine.split_kind == "hook"
    xs = [images(2, 16, dtype=torch.float32, seed=s) for s in range(6)]
    expected = [engine(x, ce.TopK(2)) for x in xs]
    # both forwards pass the target layer together, so each sees the other's hook registered
    net.gate.barrier = threading.Barrier(2, timeout=WAIT_S)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda x: engine(x, ce.TopK(2)), xs))
    for got, want in zip(results, expected, strict=True):
        assert_same_result(got, want)


def count_traces(monkeypatch) -> list[int]:
    """The input width of every trace the CAMModels make from now on."""
    widths, trace = [], model_module.trace

    def counted(model, example=None, **options):
        widths.append(example.shape[-1])
        return trace(model, example, **options)

    monkeypatch.setattr(model_module, "trace", counted)
    return widths


def test_export_split_builds_each_size_once_under_concurrent_calls(monkeypatch):
    torch.manual_seed(0)
    net = ShapeBranchNet(nn.Identity()).eval()
    xs = {size: images(2, size, dtype=torch.float32, seed=size) for size in (12, 14, 16)}
    engine = ce.CAMEngine(net, "body", input_size=(16, 16))
    assert engine.split_kind == "export"
    widths = count_traces(monkeypatch)
    sizes = [12, 14, 16] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda size: engine(xs[size], ce.TopK(2)), sizes))
    assert sorted(widths) == [12, 14]  # 16 was built with the engine
    for size, res in zip(sizes, results, strict=True):
        assert_gradcam(res, net, xs[size])


def test_export_splits_per_size_are_a_bounded_lru(monkeypatch):
    torch.manual_seed(0)
    net = ShapeBranchNet(nn.Identity()).eval()
    xs = {size: images(2, size, dtype=torch.float32, seed=size) for size in (12, 14)}
    monkeypatch.setattr(model_module, "SPLITS_KEPT", 2)  # the 16 px split and one more
    engine = ce.CAMEngine(net, "body", input_size=(16, 16))
    widths = count_traces(monkeypatch)
    for size in (12, 14, 12, 12):
        assert_gradcam(engine(xs[size]), net, xs[size])
    assert widths == [12, 14, 12]  # 14 evicted 12; the repeat was kept
    assert len(engine.model._built) == 2


def test_a_cam_model_copies_and_pickles_with_its_own_lock():
    torch.manual_seed(0)
    net = TinyNet(nn.Identity()).eval()
    wrapped = ce.wrap(net, "body", input_size=(16, 16))
    x = images(2, 16, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(wrapped), torch.load(buffer, weights_only=False)):
        assert twin._lock is not wrapped._lock
        for got, want in zip(twin(x), wrapped(x), strict=True):
            torch.testing.assert_close(got, want)
