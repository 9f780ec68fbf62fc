"""The benchmark code computes the right things: equal heatmaps across backends, the timing and
memory harness, ratios, targets, tables, chart, profiler stages and the two commands. No timings
are asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import cam_engine as ce
from cam_engine.bench import backends as bk
from cam_engine.bench import profiling, report
from cam_engine.bench.harness import (
    Measurement,
    make_case,
    peak_memory_child,
    run_all_classes,
    run_model,
    time_interleaved,
)
from cam_engine.bench.models import ModelSpec
from cam_engine.cli import main
from cam_engine.reference import reference_gradcam

TINY = ModelSpec("resnet18", size=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here (results do not depend on it), the suite's setting restored after:
    ``bench --quick`` and ``--threads`` set it process-wide."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(TINY, 2, None, "gradcam", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def vgg_case(tmp_path_factory):
    spec = ModelSpec("vgg11", size=64)
    return make_case(spec, 2, None, "gradcam", tmp_path_factory.mktemp("models"))


# Backends: every one computes the same maps as the engine -------------------------------------

# pytorch-grad-cam's Eigen maps take the SVD's arbitrary sign: ours fix it (test_methods.py)
SIGNED = ("eigencam", "eigengradcam")
EXPLAINERS = [
    (b, m)
    for b in ("reference", "pytorch-grad-cam", "torchcam", "captum", "ort-cam")
    for m in ("cam", *bk.PGC_CLASSES)
    if bk.supports(bk.get(b), m) and m not in SIGNED
]


@pytest.mark.parametrize(("backend", "method"), EXPLAINERS)
def test_backend_heatmaps_equal_the_engines(case, backend, method):
    task = replace(case, method=method)
    try:
        ready = bk.get(backend).prepare(task)
    except bk.Unavailable as exc:
        pytest.skip(str(exc))
    expected = ce.CAMEngine(case.model, case.layer, method)(case.x).heatmaps
    got = ready.heatmaps(ready.run(case.x))
    assert got.shape == expected.shape == (2, 1, 64, 64)
    # float32 everywhere; pytorch-grad-cam resizes with OpenCV and divides by (max + 1e-7)
    assert_close(got.float(), expected, atol=2e-4, rtol=0)


def test_engine_compile_compiles_the_trunk_in_the_chosen_mode(case):
    task = replace(case, compile_mode="reduce-overhead")  # CUDA graphs: skipped on a CPU
    ready = bk.get("engine-compile").prepare(task)
    assert ready.call.model.compile_options == {"mode": "reduce-overhead"}
    expected = ce.CAMEngine(case.model, case.layer, "gradcam")(case.x).heatmaps
    assert_close(ready.heatmaps(ready.run(case.x)), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="compile_mode must be one of default, reduce-overhead"):
        ModelSpec("resnet18", compile_mode="fast")


def test_hooks_live_only_between_attach_and_detach(case):
    ready = bk.get("pytorch-grad-cam").prepare(case)
    module = case.model.get_submodule(case.layer)
    before = len(module._forward_hooks)
    ready.attach()
    assert len(module._forward_hooks) > before
    ready.detach()
    assert len(module._forward_hooks) == before
    assert all(p.grad is None for p in case.model.parameters())


@pytest.mark.parametrize("backend", ["plain", "ort-plain"])
def test_plain_backends_return_the_models_logits(case, backend):
    try:
        ready = bk.get(backend).prepare(case)
    except bk.Unavailable as exc:
        pytest.skip(str(exc))
    with torch.no_grad():
        expected = case.model(case.x)
    assert_close(torch.as_tensor(ready.run(case.x)), expected, atol=1e-4, rtol=1e-4)


def test_cam_is_unavailable_without_a_gap_head(vgg_case):
    assert vgg_case.fc is None
    with pytest.raises(bk.Unavailable, match="global-average-pool"):
        bk.get("reference").prepare(replace(vgg_case, method="cam"))


def test_fc_name_finds_the_final_linear_layer(case):
    assert case.fc == "fc"


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match="pytorch-grad-cam"):
        bk.get("nope")


# Timing harness --------------------------------------------------------------------------------


class _Recorder:
    """A fake backend logging attach / call / detach events."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def prepared(self) -> bk.Prepared:
        return bk.Prepared(
            lambda x: self.log.append(f"call {self.name}"),
            attach=lambda: self.log.append(f"attach {self.name}"),
            detach=lambda: self.log.append(f"detach {self.name}"),
        )


def test_time_interleaved_warms_up_rotates_and_hooks_each_call():
    log: list[str] = []
    calls = {n: _Recorder(n, log).prepared() for n in "abc"}
    times = time_interleaved(calls, torch.zeros(1), warmup=1, repeats=4, progress=False)
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)
    order = [e.split()[1] for e in log if e.startswith("call")]
    assert order == list("abc" + "abc" + "bca" + "cab" + "abc")  # warm-up, then rotated rounds
    triples = [log[i : i + 3] for i in range(0, len(log), 3)]
    assert all(
        [t[0].split()[0], t[1].split()[0], t[2].split()[0]] == ["attach", "call", "detach"]
        for t in triples
    )


def test_measurement_median_and_images_per_second():
    row = Measurement("m", 8, 224, "cpu", "gradcam", "engine", times_s=[0.4, 0.1, 0.2, 0.3, 9.0])
    assert row.median_s == 0.3
    assert row.images_per_s == pytest.approx(8 / 0.3)
    assert Measurement("m", 8, 224, "cpu", "-", "plain").images_per_s is None


def test_peak_growth_sees_a_100_mib_allocation():
    """In a fresh interpreter, as the bench measures: in a test worker that loaded other
    libraries (OpenVINO's allocator, ...) freed memory may stay resident and be reused."""
    script = (
        "import torch\n"
        "from cam_engine.bench import backends as bk, memory\n"
        "def allocate(_x):\n"
        "    return torch.ones(25 * 2**20)  # 100 MiB, touched\n"
        "print(memory.peak_growth(bk.Prepared(allocate), torch.zeros(1), warmup=1))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parents[1])  # fmt: skip
    grown = int(done.stdout.split()[-1])
    assert 95 * 2**20 < grown < 140 * 2**20


def test_peak_memory_child_of_plain_inference(case):
    # resnet18 at 64 px, batch 2: activations of a few MiB, far below the weights' 45 MiB
    grown = peak_memory_child(TINY, 2, case.layer, "-", "plain", case.workdir)
    assert 0 < grown < 45 * 2**20


def test_all_classes_matches_pgc_and_extrapolates(case):
    result = run_all_classes(TINY, 1, repeats=1, progress=False)
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.classes == 1000
    assert result.max_diff < 2e-4
    assert result.pgc_extrapolated_s == pytest.approx(result.pgc_call_s[0] * 1000)


def test_all_classes_skips_heads_without_closed_form():
    result = run_all_classes(ModelSpec("vgg11", size=32), 1, repeats=1, progress=False)
    assert result.skipped and "global-average-pool" in result.skipped


# Ratios, targets, tables, chart -------------------------------------------------------------------


def _row(backend, method, seconds, memory=None, batch=8, model="resnet50", skipped=None):
    m = Measurement(model, batch, 224, "cpu", method, backend, [seconds], memory, skipped=skipped)
    return m.to_dict()


MIB = 1 << 20
ROWS = [
    _row("plain", "-", 1.0, memory=100 * MIB),
    _row("engine", "gradcam", 1.1, memory=120 * MIB),
    _row("engine", "cam", 1.08),
    _row("reference", "gradcam", 5.5),
    _row("pytorch-grad-cam", "gradcam", 4.4),
    _row("ort-plain", "-", 0.5, memory=4096),
    _row("ort-cam", "cam", 0.6, memory=8 * MIB),
    _row("captum", "gradcam", 0.0, skipped="captum is not installed"),
]


def test_ratios_by_hand():
    rows = {(r["backend"], r["method"]): r for r in report.ratios(ROWS)}
    engine = rows["engine", "gradcam"]
    assert engine["overhead"] == pytest.approx(1.1)
    assert engine["vs_reference"] == pytest.approx(5.0)
    assert engine["vs_pgc"] == pytest.approx(4.0)
    assert engine["memory_vs_plain"] == pytest.approx(1.2)
    assert rows["ort-cam", "cam"]["overhead"] == pytest.approx(1.2)  # relative to ort-plain
    assert rows["ort-cam", "cam"]["memory_vs_plain"] is None  # a 4 KiB baseline: no ratio
    assert rows["plain", "-"]["overhead"] is None


def test_targets_met_and_missed():
    checked = {c["target"]: c for c in report.check_targets(report.ratios(ROWS))}

    def find(prefix: str) -> dict:
        (found,) = [c for t, c in checked.items() if t.startswith(prefix)]
        return found

    vs_pgc = find("resnet50 b8 cpu gradcam engine: images/s vs pytorch-grad-cam >= 3.5")
    assert vs_pgc["met"] and vs_pgc["measured"] == pytest.approx(4.0)
    assert find("resnet50 b8 cpu gradcam engine: explain overhead")["met"]  # 1.10 <= 1.15
    cam = find("resnet50 b8 cpu cam engine: explain overhead")
    assert not cam["met"] and cam["measured"] == pytest.approx(1.08)  # 1.08 > 1.05
    assert find("resnet50 b8 cpu gradcam engine: peak memory")["met"]  # 1.2 <= 1.3
    assert not any(t.startswith("vgg16") for t in checked)  # no vgg16 rows, no verdict


def _doc(rows=ROWS):
    env = report.environment("cpu")
    config = {"warmup": 1, "repeats": 1}
    return {"environment": env, "config": config, "rows": rows, "all_classes": []}


def test_markdown_has_the_numbers_and_the_skip_reasons():
    text = report.markdown(_doc(), "cam-engine bench --quick")
    assert "## resnet50, batch 8, 224x224, cpu" in text
    assert "| gradcam | engine | 7.3 | 1.10x | 5.00x | 4.00x |" in text
    assert "skipped: captum is not installed" in text
    assert "`cam-engine bench --quick`" in text
    assert "## Targets" in text


def test_environment_records_versions_and_device():
    env = report.environment("cpu")
    assert env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert env["device_name"] and env["cpu_count"] >= 1


def test_bar_chart_is_a_png(tmp_path):
    path = tmp_path / "chart.png"
    report.bar_chart(_doc(), path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == 900 and image.height > 200


# Profiler --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["case", "vgg_case"])
def test_profiled_call_equals_the_engine(request, which):
    c = request.getfixturevalue(which)
    engine = ce.CAMEngine(c.model, c.layer, "gradcam")
    heatmaps, colours = profiling.engine_call(engine, c.x)
    assert_close(heatmaps, engine(c.x).heatmaps, atol=0, rtol=0)
    assert_close(colours, ce.postprocess.colorize(heatmaps).cpu(), atol=0, rtol=0)


def test_profile_stages_through_the_head(vgg_case):
    engine = ce.CAMEngine(vgg_case.model, vgg_case.layer, "gradcam++")
    ours = profiling.profile_engine(engine, vgg_case.x, repeats=1)
    assert {"trunk forward (no grad)", "head forward", "backward (head only)"} <= set(ours.stages)
    assert "gradient (closed form)" not in ours.stages  # VGG's MLP head has none


@pytest.mark.parametrize("method", ["scorecam", "fullgrad", "guided-gradcam"])
def test_profile_command_runs_every_kind_of_method(tmp_path: Path, method):
    """Every method profiles (``--method scorecam`` used to crash with a TypeError)."""
    argv = ["profile", "--model", "resnet18", "--size", "32", "--batch", "1", "--repeats", "1"]
    argv += ["--method", method, "--threads", "1", "--no-reference", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = (tmp_path / "profile.md").read_text()
    assert "| method |" in table and "| trunk forward (no grad) |" in table


def test_profile_stages(case):
    engine = ce.CAMEngine(case.model, case.layer, "gradcam")
    ours = profiling.profile_engine(engine, case.x, repeats=1)
    assert {"trunk forward (no grad)", "head forward", "gradient (closed form)"} <= set(ours.stages)
    assert "backward (head only)" not in ours.stages  # resnet18's head has a closed form
    assert sum(ours.stages.values()) <= ours.total * 1.01
    ref = profiling.profile_reference(case.model, case.layer, case.x, repeats=1)
    assert {"forward (full model)", "backward (whole network)"} <= set(ref.stages)
    assert "| **total** |" in profiling.table(ours, ref)


def test_reference_pipeline_equals_the_reference(case):
    from cam_engine.reference import HookGradCAM

    module = case.model.get_submodule(case.layer)
    heatmaps, _ = profiling.reference_pipeline(HookGradCAM(case.model, module), case.x)
    assert_close(heatmaps, reference_gradcam(case.model, module, case.x).heatmaps)


# Commands ----------------------------------------------------------------------------------------


def test_bench_command_writes_json_markdown_and_png(tmp_path: Path):
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--models", "resnet18", "--size", "64", "--batch", "1"]
    argv += ["--backends", "plain,engine,reference", "--no-all-classes", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["backend"], r["method"]): r for r in doc["rows"]}
    assert set(rows) == {("plain", "-"), ("engine", "gradcam"), ("engine", "cam")} | {
        ("reference", "gradcam"),
        ("reference", "cam"),
    }
    assert all(len(r["times_s"]) == 3 for r in rows.values())
    assert rows["engine", "gradcam"]["max_diff"] == 0.0  # the engine is the comparison
    assert rows["reference", "gradcam"]["max_diff"] < 1e-5
    assert "torch" in doc["environment"]["versions"]
    text = (out / "BENCHMARKS.md").read_text()
    assert "| gradcam | reference |" in text
    assert "`cam-engine bench --models resnet18 --batch-size 1 --input-size 64 --repeats 3" in text
    assert (out / "bench.png").stat().st_size > 0
    markdown = tmp_path / "again.md"
    argv = ["bench", "--render", str(out / "results.json"), "--out", str(out)]
    assert main([*argv, "--markdown", str(markdown)]) == 0
    assert markdown.read_text() == (out / "BENCHMARKS.md").read_text()


def test_autocast_runs_torch_backends_in_bf16_and_skips_onnx_runtime(tmp_path: Path):
    spec = ModelSpec("resnet18", size=64, autocast="bf16")
    backends = ["plain", "engine", "reference", "ort-plain", "ort-cam"]
    rows = run_model(
        spec,
        2,
        ["gradcam"],
        backends,
        repeats=1,
        warmup=0,
        memory=False,
        workdir=tmp_path,
        progress=False,
    )
    by_backend = {r.backend: r for r in rows}
    for name in ("ort-plain", "ort-cam"):
        assert "autocast" in by_backend[name].skipped
    # bf16 maps: the hook reference's and the engine's agree to bf16 precision, not float32's
    assert 1e-4 < by_backend["reference"].max_diff < 0.1
    assert all(len(by_backend[n].times_s) == 1 for n in ("plain", "engine", "reference"))
    with pytest.raises(ValueError, match="autocast must be one of bf16, fp16"):
        ModelSpec("resnet18", autocast="int8")


def test_bench_command_rejects_unknown_names(capsys):
    assert main(["bench", "--quick", "--backends", "engine,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, bound",
    [("--pipeline-images", "0", ">= 1"), ("--pipeline-workers", "-1", ">= 0")],
)
def test_bench_command_rejects_bad_pipeline_counts(option, value, bound, capsys):
    assert main(["bench", "--quick", "--backends", "pipeline", option, value]) == 2
    assert f"{option} must be {bound}, got {value}" in capsys.readouterr().err


def test_profile_command_writes_table_and_traces(tmp_path: Path):
    argv = ["profile", "--model", "resnet18", "--size", "64", "--batch", "1", "--repeats", "1"]
    assert main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "trunk forward" in (tmp_path / "profile.md").read_text()
    for name in ("trace_engine.json", "trace_reference.json"):
        assert json.loads((tmp_path / name).read_text())["traceEvents"]
