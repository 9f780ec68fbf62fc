"""``cam-engine explain --ray`` (:mod:`cam_engine.distributed`) on a local Ray with 2 CPUs.

The reference is the single-process ``cam-engine explain`` on the same generated images: the
distributed run must give the same predictions, heatmaps, pictures and skipped files, once
each, also after a rerun, a killed actor or a killed driver.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cam_engine as ce
from cam_engine import cli
from cam_engine.demo import shapes
from cam_engine.demo.model import ShapesNet
from cam_engine.pipeline import ExplainConfig, compute
from cam_engine.pipeline.outputs import picture_name

HERE = Path(__file__).resolve()


def pid_seeded_net() -> torch.nn.Module:
    """A demo-architecture model whose random weights differ from one process to another."""
    torch.manual_seed(os.getpid())
    return ShapesNet()


#: the demo model as in the README's offline try-out
MODEL_SPEC = "cam_engine.demo.model:pretrained"
OPTIONS = {"input_size": "64", "mean": "0,0,0", "std": "1,1,1", "method": "cam", "targets": "top2"}
MODEL = ["--model", MODEL_SPEC]
for _name, _value in OPTIONS.items():
    MODEL += [f"--{_name.replace('_', '-')}", _value]
UNREADABLE = ["b/broken.png", "c/truncated.png"]


def _write_images(root: Path, count: int, sizes: tuple[int, ...]) -> None:
    """``count`` shapes images in three folders, of varied sizes, and two unreadable files."""
    for i in range(count):
        image = shapes.single(1, sizes[i % len(sizes)], seed=i).images[0]
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        path = root / "abc"[i % 3] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    (root / UNREADABLE[0]).write_bytes(b"not an image")
    whole = (root / "a" / "000.png").read_bytes()
    (root / UNREADABLE[1]).write_bytes(whole[: len(whole) // 2])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_images(root, 12, (64, 80, 96, 50))
    return root


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """25 batches of 2 (larger images: slower pictures), for a kill to land mid-run."""
    root = tmp_path_factory.mktemp("many")
    _write_images(root, 48, (192, 224))
    return root


def _explain(images: Path, out: Path, *extra: str) -> int:
    """``cam-engine explain`` in this process."""
    return cli.main(["explain", str(images), *MODEL, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The single-process ``cam-engine explain`` outputs."""
    out = tmp_path_factory.mktemp("reference")
    assert _explain(images, out, "--batch-size", "4", "--workers", "0") == 0
    return out


@pytest.fixture(scope="module")
def many_reference(many_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("many_reference")
    assert _explain(many_images, out, "--workers", "0") == 0
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def distributed(ray_cluster, images, tmp_path_factory) -> Path:
    """``cam-engine explain --ray`` (the module's Ray) over the same images."""
    out = tmp_path_factory.mktemp("distributed")
    assert _explain(images, out, "--batch-size", "3", "--ray") == 0
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _parquet(path: Path, columns: list[str] | None = None):
    import pyarrow.parquet as pq  # installed with ray[data]

    return pq.read_table(path, columns=columns)


def _shard_keys(out: Path) -> list[str]:
    """Image keys of every shard and failure file, repeats included."""
    files = sorted((out / "shards").glob("*.parquet")) + sorted((out / "failures").glob("*"))
    return [key for f in files for key in _parquet(f, ["image"])["image"].to_pylist()]


def assert_same_as_reference(out: Path, reference: Path, images: Path) -> None:
    """Predictions, skipped files, heatmaps and pictures equal the single-process run's."""
    from cam_engine.distributed import read_heatmaps

    mine, theirs = _rows(out / "predictions.csv"), _rows(reference / "predictions.csv")
    assert [(r["image"], r["class_id"], r["class_name"]) for r in mine] == [
        (r["image"], r["class_id"], r["class_name"]) for r in theirs
    ]
    scores = [[float(r["score"]) for r in rows] for rows in (mine, theirs)]
    np.testing.assert_allclose(*scores, rtol=1e-5)  # 6 digits in both files
    assert _rows(out / "skipped.csv") == _rows(reference / "skipped.csv")

    expected = np.load(reference / "heatmaps.npz")
    maps = dict(read_heatmaps(out))
    assert sorted(maps) == sorted(expected.files)
    for key, heat in maps.items():
        assert heat.dtype == np.float32 and heat.shape == expected[key].shape
        # float32 noise of other batches and thread counts, after min-max stretching
        np.testing.assert_allclose(heat, expected[key], atol=1e-5, rtol=0)

    for folder in ("overlays", "sheets"):
        names = sorted(p.relative_to(reference) for p in (reference / folder).rglob("*.png"))
        assert sorted(p.relative_to(out) for p in (out / folder).rglob("*.png")) == names
    for key, heat in maps.items():
        pixels = np.array(Image.open(images / key).convert("RGB"))
        original = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        colours = ce.overlay(original, torch.from_numpy(heat)[None])[0].permute(0, 2, 3, 1)
        classes = [r["class_id"] for r in mine if r["image"] == key]
        for k, c in enumerate(classes):
            png = np.asarray(Image.open(out / "overlays" / f"{picture_name(key)}.{c}.png"))
            np.testing.assert_array_equal(png, colours[k].numpy())  # made from these maps
            ref = reference / "overlays" / f"{picture_name(key)}.{c}.png"
            ref_png = np.asarray(Image.open(ref))
            # a map value on a rounding edge may move one colour-table step
            assert np.abs(png.astype(int) - ref_png).max() <= 3
    assert not (out / ".tmp").exists()


def test_outputs_equal_single_process_explain(distributed, reference, images):
    assert_same_as_reference(distributed, reference, images)
    keys = _shard_keys(distributed)
    assert len(keys) == len(set(keys)) == 12 + len(UNREADABLE)  # each image exactly once
    skipped = _rows(distributed / "skipped.csv")
    assert [r["image"] for r in skipped] == UNREADABLE and all(r["reason"] for r in skipped)


def test_actors_run_the_drivers_weights(ray_cluster, images, tmp_path):
    """A model built with random weights: the actors (other processes) run the driver's."""
    from cam_engine.distributed import explain_dataset

    model = f"{HERE}:pid_seeded_net"
    here = ["explain", str(images), "--model", model, *MODEL[2:], "--out", str(tmp_path / "ref")]
    assert cli.main([*here, "--workers", "0"]) == 0  # with this process's weights
    summary = explain_dataset([images], tmp_path / "ray", model, batch_size=2, **OPTIONS)
    assert summary.explained == 12
    assert_same_as_reference(tmp_path / "ray", tmp_path / "ref", images)


def test_rerun_skips_finished_images_and_redoes_a_lost_shard(
    distributed, reference, images, tmp_path
):
    from cam_engine.distributed import explain_dataset

    out = tmp_path / "out"
    shutil.copytree(distributed, out)
    shards = out / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    summary = explain_dataset([images], out, MODEL_SPEC, batch_size=3, **OPTIONS)
    assert (summary.attempted, summary.explained, summary.images) == (0, 12, 14)
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == before

    lost = sorted(shards.iterdir())[0]
    lost_keys = _parquet(lost, ["image"])["image"].to_pylist()
    lost.unlink()
    summary = explain_dataset([images], out, MODEL_SPEC, batch_size=3, **OPTIONS)
    assert summary.attempted == len(lost_keys) > 0  # only the lost shard's images
    assert_same_as_reference(out, reference, images)
    keys = _shard_keys(out)
    assert len(keys) == len(set(keys)) == 14

    with pytest.raises(ValueError, match="method: 'cam' there, 'gradcam' now"):
        explain_dataset([images], out, MODEL_SPEC, **{**OPTIONS, "method": "gradcam"})


def test_job_settings_bind_a_folder_once_it_has_outputs(tmp_path):
    pytest.importorskip("ray")
    from cam_engine.distributed.store import Store

    store = Store(tmp_path)
    store.start({"method": "cam", "targets": "top2"})
    store.start({"method": "gradcam", "targets": "top2"})  # a start that failed: no outputs
    store.write_batch([], [("a.png", "unreadable")])
    store.start({"method": "gradcam", "targets": "top2"})
    with pytest.raises(ValueError, match="method: 'gradcam' there, 'cam' now.*--overwrite"):
        store.start({"method": "cam", "targets": "top2"})
    store.start({"method": "cam", "targets": "top2"}, overwrite=True)
    assert not (tmp_path / "failures").exists()


def test_the_store_docstring_names_the_csv_columns_written():
    pytest.importorskip("pyarrow")
    from cam_engine.distributed import store
    from cam_engine.pipeline.outputs import PREDICTION_COLUMNS

    assert re.search(r"predictions\.csv +" + ", ".join(PREDICTION_COLUMNS) + ":", store.__doc__)
    assert re.search(r"skipped\.csv +image, reason\n", store.__doc__)


def test_a_second_run_into_the_same_out_is_refused(images, tmp_path):
    """The lock is taken before Ray starts; the OS drops it when its holder dies."""
    pytest.importorskip("ray")
    import fcntl

    from cam_engine.distributed import explain_dataset

    tmp_path.joinpath(".lock").touch()
    with open(tmp_path / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=f"holds the lock {tmp_path / '.lock'}"):
            explain_dataset([images], tmp_path, MODEL_SPEC, **OPTIONS)
    assert os.listdir(tmp_path) == [".lock"]


def _read(path: Path) -> list[dict[str, str]]:
    """A CSV whose names need not be UTF-8 (written back as their bytes)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
        return list(csv.DictReader(file))


def test_odd_inputs_cost_only_themselves_on_ray(ray_cluster, tmp_path):
    """Names with a newline, with bytes that are not UTF-8, of 250 bytes; an animated GIF named
    .png; an image over the pixel limit: the same outputs as the single process, none fatal."""
    from cam_engine.distributed import explain_dataset, read_heatmaps
    from cam_engine.pipeline import output_name

    root = tmp_path / "images"
    root.mkdir()
    pictures = [shapes.single(1, 64, seed=i).images[0] for i in range(6)]
    pictures = [Image.fromarray((p.permute(1, 2, 0) * 255).byte().numpy()) for p in pictures]
    names = ["new\nline.png", os.fsdecode(b"caf\xe9.png"), "x" * 246 + ".png"]
    for name, picture in zip(names, pictures, strict=False):
        picture.save(root / name)
    pictures[3].save(root / "anim.png", format="GIF", save_all=True, append_images=pictures[4:])
    pictures[0].resize((80, 80)).save(root / "big.png")  # 6400 pixels
    reference, out = tmp_path / "reference", tmp_path / "ray"
    single = ["explain", str(root), *MODEL, "--out", str(reference), "--max-pixels", "5000"]
    assert cli.main([*single, "--workers", "0"]) == 0

    config = ExplainConfig([root], MODEL_SPEC, out, batch_size=5, max_pixels=5000, **OPTIONS)
    summary = explain_dataset(config)  # a config: as the keyword arguments of the other tests
    assert (summary.explained, [key for key, _ in summary.skipped]) == (4, ["big.png"])
    mine, theirs = _read(out / "predictions.csv"), _read(reference / "predictions.csv")
    assert {r["image"] for r in mine} == {*names, "anim.png"}
    assert [(r["image"], r["class_id"]) for r in mine] == [
        (r["image"], r["class_id"]) for r in theirs
    ]
    assert _read(out / "skipped.csv") == _read(reference / "skipped.csv")
    maps, expected = dict(read_heatmaps(out)), np.load(reference / "heatmaps.npz")
    assert sorted(maps) == sorted(expected.files) == sorted(map(output_name, [*names, "anim.png"]))
    for name, heat in maps.items():
        np.testing.assert_allclose(heat, expected[name], atol=1e-5, rtol=0)
    runs = (out, reference)
    for folder in ("overlays", "sheets"):
        found = [sorted(p.relative_to(o) for p in (o / folder).rglob("*.png")) for o in runs]
        assert found[0] == found[1] and len(found[0]) == 4 * (2 if folder == "overlays" else 1)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rpartition(")")[2].split()[1])  # the field after the name: ppid
    return False


def _actor_pids() -> list[int]:
    """The explaining actors' processes (Ray names them ``ray::MapWorker(...Explainer)``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"MapWorker" in cmdline and b"Explainer" in cmdline:
            if _descends_from(int(entry.name), os.getpid()):  # this module's Ray only
                found.append(int(entry.name))
    return found


class _KillAtFirstShard(threading.Thread):
    """Sends SIGKILL to ``victims()[0]`` as soon as ``out`` holds a shard."""

    def __init__(self, out: Path, victims) -> None:
        super().__init__(daemon=True)
        self.out, self.victims = out, victims
        self.killed: int | None = None
        self.shards_then = 0

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            shards = list((self.out / "shards").glob("*.parquet"))
            victims = self.victims() if shards else []
            if victims:
                os.kill(victims[0], signal.SIGKILL)
                self.killed, self.shards_then = victims[0], len(shards)
                return
            time.sleep(0.01)


def _wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_killed_actor_is_replaced_and_nothing_is_lost_or_repeated(
    ray_cluster, many_images, many_reference, tmp_path
):
    from cam_engine.distributed import explain_dataset

    out = tmp_path / "out"
    _wait_until(lambda: not _actor_pids())  # earlier runs' actors gone: a victim is this run's
    killer = _KillAtFirstShard(out, _actor_pids)
    killer.start()
    summary = explain_dataset([many_images], out, MODEL_SPEC, batch_size=2, **OPTIONS)
    killer.join()
    assert killer.killed is not None  # an actor, once the first batch was written
    assert killer.shards_then < len(list((out / "shards").iterdir()))  # with work left
    assert (summary.attempted, summary.explained) == (50, 48)
    assert_same_as_reference(out, many_reference, many_images)
    keys = _shard_keys(out)
    assert len(keys) == len(set(keys)) == 50


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_killed_driver_then_rerun_completes_once(
    ray_cluster, many_images, many_reference, tmp_path
):
    from cam_engine.distributed import explain_dataset

    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "cam_engine.cli", "explain", str(many_images), *MODEL]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(  # this tree's code: -m imports it from the working directory
            [*command, "--out", str(out), "--batch-size", "2", "--ray", address],
            cwd=HERE.parents[1],
            stdout=log,
            stderr=log,
        )
        killer = _KillAtFirstShard(out, lambda: [driver.pid])
        killer.run()
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()
    _wait_until(lambda: not _actor_pids())  # Ray ends a dead driver's actors
    done = set(_shard_keys(out))
    assert 0 < len(done) < 50  # the kill left work undone

    summary = explain_dataset([many_images], out, MODEL_SPEC, batch_size=2, **OPTIONS)
    assert summary.attempted == 50 - len(done)  # the rerun skipped what was done
    assert_same_as_reference(out, many_reference, many_images)
    keys = _shard_keys(out)
    assert len(keys) == len(set(keys)) == 50


def test_an_image_that_fails_to_explain_is_recorded_and_the_others_written(
    images, reference, tmp_path, monkeypatch
):
    """The actor's own code, in this process: a batch whose engine call fails is redone image
    by image; only the culprit is recorded (with the reason), the others are explained."""
    pytest.importorskip("ray")
    from cam_engine.distributed import read_heatmaps
    from cam_engine.distributed.worker import Explainer, decode

    keys = ["a/000.png", "b/001.png", UNREADABLE[0], "c/002.png"]
    paths = np.array([os.fsencode(images / key) for key in keys])
    batch = decode({"path": paths, "key": np.array([os.fsencode(k) for k in keys])}, (64, 64))
    culprit = torch.from_numpy(batch["input"][1])
    engine_call = compute.explain_batch

    def fails_on_culprit(engine, loaded, decoded, targets):
        if any(torch.equal(x, culprit) for x in decoded.inputs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return engine_call(engine, loaded, decoded, targets)

    monkeypatch.setattr(compute, "explain_batch", fails_on_culprit)
    config = ExplainConfig([images], MODEL_SPEC, tmp_path, save="npz", **OPTIONS)
    returned = Explainer(config, "cpu", None)(batch)

    assert returned["image"].tolist() == keys
    assert returned["ok"].tolist() == [True, False, False, True]
    maps = dict(read_heatmaps(tmp_path))
    assert sorted(maps) == ["a/000.png", "c/002.png"]
    expected = np.load(reference / "heatmaps.npz")
    for key, heat in maps.items():
        np.testing.assert_allclose(heat, expected[key], atol=1e-5, rtol=0)
    (failures,) = (tmp_path / "failures").iterdir()
    reasons = {row["image"]: row["reason"] for row in _parquet(failures).to_pylist()}
    assert reasons["b/001.png"] == "RuntimeError: CUDA out of memory (simulated)"
    assert reasons[UNREADABLE[0]] == "not a PNG, JPEG, GIF or WebP file"
    assert not (tmp_path / "overlays").exists()  # --save npz: no pictures


def test_without_ray_the_error_names_the_extra(images, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("cam_engine.distributed")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    assert _explain(images, tmp_path, "--ray") == 2
    assert 'pip install "cam-engine[ray]"' in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
