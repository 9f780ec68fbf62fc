"""The explain-job rows of the benchmark, the spread and load average of every figure, and the
model files a bench run leaves behind. No timings are asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cam_engine.bench import report
from cam_engine.bench.harness import Measurement
from cam_engine.bench.pipeline import ENGINE, JOB, write_photos
from cam_engine.cli import main
from cam_engine.commands.bench import _remove_new


def test_iqr_of_the_rounds_images_per_second_by_hand():
    # 8 images: rounds of 1, 2, 4, 8 s -> 8, 4, 2, 1 images/s; inclusive quartiles of
    # [1, 2, 4, 8]: 1 + 0.75 * (2 - 1) = 1.75 and 4 + 0.25 * (8 - 4) = 5
    row = Measurement("m", 8, 224, "cpu", "gradcam", "engine", times_s=[1.0, 2.0, 4.0, 8.0])
    assert row.images_per_s_iqr == pytest.approx((1.75, 5.0))
    assert Measurement("m", 8, 224, "cpu", "-", "plain", [1.0]).images_per_s_iqr is None
    # a pipeline row: one call explains `images` files, not `batch`
    job = Measurement("m", 8, 224, "cpu", "gradcam", JOB, [2.0, 4.0], images=32)
    assert job.images_per_s == pytest.approx(32 / 3.0)
    assert job.to_dict()["images_per_s_iqr"] == pytest.approx((8 + 0.25 * 8, 16 - 0.25 * 8))


def _doc(rows):
    env = report.environment("cpu")
    return {"environment": env, "config": {"warmup": 1, "repeats": 2}, "rows": rows,
            "all_classes": []}  # fmt: skip


def test_markdown_shows_spread_load_and_the_job_against_the_engine():
    load = (3.5, 2.25, 1.0)
    engine = Measurement("resnet50", 8, 224, "cpu", "gradcam", "engine", [1.0, 2.0], load_avg=load)
    decoded = Measurement(
        "resnet50", 8, 224, "cpu", "gradcam", ENGINE, [1.0, 1.0], images=32, photos="480x640",
        load_avg=(4.0, 3.0, 2.0),
    )  # fmt: skip
    job = Measurement(
        "resnet50", 8, 224, "cpu", "gradcam", JOB, [1.25, 1.25], images=32, photos="480x640",
        load_avg=(4.0, 3.0, 2.0),
    )  # fmt: skip
    text = report.markdown(_doc([engine.to_dict(), decoded.to_dict(), job.to_dict()]))
    # 8 images in 1 and 2 s: 8 and 4 images/s, median 1.5 s -> 5.3; quartiles 5.0 and 7.0
    assert "| gradcam | engine | 5.3 (5.0-7.0) |" in text
    assert "Load average when measured: 3.50, 2.25, 1.00 (1, 5, 15 minutes)." in text
    # the job's rows have their own table: 32 / 1.25 = 25.6 against 32 images/s = 0.80x
    assert "## The whole explain job" in text
    assert "| resnet50 | gradcam | 8 | 480x640 | 32 | 32.0 (32.0-32.0) | 25.6 (25.6-25.6) " \
        "| 0.80x | 4.00, 3.00, 2.00 |" in text  # fmt: skip
    assert f"| gradcam | {JOB} |" not in text  # not among the same-batch backends


def test_results_of_earlier_versions_still_render():
    row = Measurement("resnet50", 8, 224, "cpu", "gradcam", "engine", [1.0, 2.0]).to_dict()
    for key in ("images", "photos", "load_avg", "images_per_s_iqr"):
        del row[key]
    assert "| gradcam | engine | 5.3 |" in report.markdown(_doc([row]))


def test_photos_are_deterministic_jpegs(tmp_path):
    first = write_photos(tmp_path / "a", 2, (48, 64))
    again = write_photos(tmp_path / "b", 2, (48, 64))
    assert [p.name for p in first] == ["000.jpg", "001.jpg"]
    for a, b in zip(first, again, strict=True):
        assert a.read_bytes() == b.read_bytes()
    with Image.open(first[0]) as image:
        assert image.format == "JPEG" and image.size == (64, 48)
        pixels = np.asarray(image, dtype=np.float64)
    assert pixels.std() > 20  # a picture, not a flat field
    assert first[0].read_bytes() != first[1].read_bytes()


def test_a_bench_run_deletes_the_model_files_it_created(tmp_path):
    models = tmp_path / "models"
    (models / "old").mkdir(parents=True)
    (models / "old" / "kept.onnx").write_bytes(b"1")
    before = set(models.rglob("*"))
    (models / "new").mkdir()
    (models / "new" / "a.onnx").write_bytes(b"2")
    (models / "b.onnx").write_bytes(b"3")
    _remove_new(models, before)
    assert set(models.rglob("*")) == before
    _remove_new(tmp_path / "none", set())  # nothing exported: nothing to do
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "c.onnx").write_bytes(b"4")
    _remove_new(fresh, set())
    assert not fresh.exists()


def test_bench_command_times_the_job_and_the_engine_on_the_same_files(tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--models", "resnet18", "--input-size", "32", "--batch-size", "1"]
    argv += ["--backends", "pipeline", "--repeats", "1", "--warmup", "0", "--no-all-classes"]
    argv += ["--pipeline-images", "3", "--pipeline-workers", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    found = [(r["backend"], r["photos"], r["images"], len(r["times_s"])) for r in doc["rows"]]
    assert found == [
        (ENGINE, "224x224", 3, 1),
        (JOB, "224x224", 3, 1),
        (ENGINE, "480x640", 3, 1),
        (JOB, "480x640", 3, 1),
    ]
    assert "--pipeline-images 3 --pipeline-workers 0" in doc["config"]["command"]
    assert all(len(r["load_avg"]) == 3 for r in doc["rows"])
    assert "## The whole explain job" in (out / "BENCHMARKS.md").read_text()
    assert not (out / "pipeline").exists()  # the photos and the job's outputs are deleted
