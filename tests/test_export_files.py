"""The export's settings, its metadata schema, how the file is written, and what OrtCAM accepts.

Everything runs on a tiny stride-4 network (exports in well under a second) and on ORT's CPU.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re

import numpy as np
import onnx
import pytest
import torch
from conftest import images
from torch import nn

import cam_engine as ce
from cam_engine.export import CAMMetadata, ExportOptions, OrtCAM, metadata, to_onnx, writer

F32 = torch.float32


class TinyNet(nn.Module):
    """conv stride 2 -> ReLU -> MaxPool2d(2) -> conv -> ReLU: a (12, H/4, W/4) map; GAP -> linear.

    Target map stride 4: at 32x24 the map is 8x6, so the smallest input is 4x4.
    """

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def tiny_dynamic(tiny, tmp_path_factory):
    """A dynamic-size top-2 file of the tiny net, exported at 32x24."""
    path = tmp_path_factory.mktemp("tiny") / "dynamic.onnx"
    return to_onnx(tiny, path, "features", topk=2, input_size=(32, 24), dynamic_size=True)


@pytest.fixture(scope="module")
def tiny_classes(tiny, tmp_path_factory):
    """A fixed-size (32x32) Grad-CAM file of the tiny net with a classes input."""
    path = tmp_path_factory.mktemp("tiny") / "classes.onnx"
    return to_onnx(
        tiny, path, "features", method="gradcam", input_size=(32, 32), classes_input=True
    )


# --- ExportOptions --------------------------------------------------------------------------------


def test_options_normalise_and_are_frozen():
    options = ExportOptions(input_size=[32, 24], mean=[0, 0, 0], std=np.ones(3).tolist())
    assert options.input_size == (32, 24) and options.mean == (0.0, 0.0, 0.0)
    assert options.std == (1.0, 1.0, 1.0) and isinstance(options.mean[0], float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.topk = 3


@pytest.mark.parametrize(
    "setting,match",
    [
        ({"method": "gradcam++"}, "supports methods cam, gradcam"),
        ({"topk": 0}, "topk must be a positive int"),
        ({"topk": True}, "topk must be a positive int"),
        ({"topk": 1.0}, "topk must be a positive int"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"opset": 0}, "opset must be a positive int"),
        ({"input_size": (32,)}, r"input_size must be 2 ints"),
        ({"input_size": (32, 0)}, r"input_size must be \(H, W\) of positive ints"),
        ({"input_size": (32.0, 32)}, r"input_size must be 2 ints"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 floats"),
        ({"std": (1, 0, 1)}, "std must be positive"),
        ({"dynamic_size": "yes"}, "dynamic_size must be a bool"),
        ({"exporter": "onnx"}, "unknown exporter 'onnx'"),
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
        ({"colormap": "rainbow"}, "unknown colormap"),
        ({"colormap": "jet", "upsample": False}, "overlay needs upsample=True"),
    ],
)
def test_options_reject_bad_values(setting, match, tiny, tmp_path):
    with pytest.raises(ValueError, match=match):
        ExportOptions(**setting)
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=match):  # the same check through to_onnx's keywords
        to_onnx(tiny, path, "features", **setting)
    assert not path.exists()


def test_options_and_keyword_settings_merge(tiny, tmp_path):
    options = ExportOptions(method="gradcam", topk=3, input_size=(32, 24), check=False)
    result = to_onnx(tiny, tmp_path / "m.onnx", "features", options, topk=2, dynamic_size=True)
    meta = result.metadata
    assert (meta["method"], meta["topk"], meta["input_size"]) == ("gradcam", 2, [32, 24])
    assert meta["dynamic_size"] is True and result.errors == {}  # check=False from options
    with pytest.raises(TypeError, match="options must be an ExportOptions, got str 'gradcam'"):
        to_onnx(tiny, tmp_path / "x.onnx", "features", "gradcam")
    with pytest.raises(TypeError, match=r"unknown export setting\(s\) top_k"):
        to_onnx(tiny, tmp_path / "x.onnx", "features", top_k=2)
    assert not (tmp_path / "x.onnx").exists()


# --- the metadata schema --------------------------------------------------------------------------


def _stored(path) -> dict:
    proto = onnx.load(str(path))
    return json.loads({p.key: p.value for p in proto.metadata_props}["cam_engine"])


def test_stored_metadata_round_trips_and_every_key_is_documented(tiny_dynamic):
    stored = _stored(tiny_dynamic.path)
    assert stored == tiny_dynamic.metadata
    meta = CAMMetadata.from_dict(stored)
    assert meta.to_dict() == stored and CAMMetadata.from_json(meta.to_json()) == meta
    assert meta.schema_version == 1 and meta.input_size == (32, 24)
    assert meta.inputs == {"x": ("batch", 3, "height", "width")}
    # the module docstring's table documents exactly the stored keys
    rows = re.findall(r"^``(\w+)``(?:, ``(\w+)``)? {2,}", metadata.__doc__, re.M)
    assert {key for row in rows for key in row if key} == set(stored)


def test_min_input_size_is_the_target_maps_stride(tiny, tiny_dynamic, tmp_path):
    assert tiny_dynamic.metadata["min_input_size"] == [4, 4]  # stride 2 * 2, map 8x6 at 32x24
    # measured at the export's size, not at the one a given CAMModel was built for: at 30 the
    # map is 15 -> 7 cells (30 // 7 = 4); at 64 it would be 16 (30 // 16 = 1)
    wrapped = ce.CAMModel(tiny, "features", input_size=(64, 64))
    result = to_onnx(wrapped, tmp_path / "m.onnx", input_size=(30, 30), check=False)
    assert result.metadata["min_input_size"] == [4, 4]


def _valid() -> dict:
    return {
        "schema_version": 1, "version": "0.1.0", "method": "cam", "target_layer": "features",
        "head": "gap-linear", "exporter": "torchscript", "topk": 2, "num_classes": 6,
        "input_size": [32, 24], "min_input_size": [4, 4], "dynamic_batch": True,
        "dynamic_size": True, "upsample": True, "normalize": True, "colormap": None,
        "alpha": 0.5, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "fp16": False,
        "inputs": {"x": ["batch", 3, "height", "width"]},
        "outputs": {"logits": ["batch", "num_classes"], "classes": ["batch", 2],
                    "heatmaps": ["batch", 2, "height", "width"]},
    }  # fmt: skip


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d.pop("topk"), r"missing key\(s\) topk"),
        (lambda d: d.update(extra=1), r"unknown key\(s\) extra"),
        (lambda d: d.pop("schema_version"), "no 'schema_version'.*export the model again"),
        (lambda d: d.update(schema_version=2), "schema version 2 is newer.*upgrade"),
        (lambda d: d.update(topk="2"), r"'topk' must be an int >= 1, got '2'"),
        (lambda d: d.update(dynamic_size=1), r"'dynamic_size' must be a bool"),
        (lambda d: d.update(method="gradcam++"), r"'method' must be 'cam' or 'gradcam'"),
        (lambda d: d.update(mean=[0, 0]), r"'mean' must be 3 numbers"),
        (lambda d: d.update(min_input_size=[40, 4]), r"'min_input_size' must be <= input_size"),
        (lambda d: d["inputs"].update(classes=["batch", "k"]), r"'outputs' must be logits, heat"),
        (lambda d: d["outputs"].pop("heatmaps"), r"'outputs' must be logits, classes, heatmaps"),
        (lambda d: d.update(colormap="jet"), r"'outputs' must be .*overlay"),
        (lambda d: d["inputs"].update(x=["batch", 3, 32]), r"'x' must be a shape of 4 axes"),
    ],
)
def test_metadata_errors_name_the_key(change, match):
    assert CAMMetadata.from_dict(_valid()).to_dict() == _valid()
    data = _valid()
    change(data)
    with pytest.raises(ValueError, match=match):
        CAMMetadata.from_dict(data)


def test_ort_cam_refuses_a_file_with_bad_metadata(tiny_dynamic, tmp_path):
    proto = onnx.load(str(tiny_dynamic.path))
    entry = next(p for p in proto.metadata_props if p.key == "cam_engine")
    stored = json.loads(entry.value)
    del stored["num_classes"]
    entry.value = json.dumps(stored)
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ValueError, match=r"broken.onnx: .*missing key\(s\) num_classes"):
        OrtCAM(broken)
    entry.value = "{not json"
    onnx.save(proto, str(broken))
    with pytest.raises(ValueError, match="not valid JSON"):
        OrtCAM(broken)


# --- the file is written whole or not at all ----------------------------------------------------


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_self_check_leaves_previous_files_untouched(tiny, tmp_path, monkeypatch):
    path, optimized = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    path.write_bytes(b"previous model")
    optimized.write_bytes(b"previous optimised model")
    monkeypatch.setitem(writer._TOLERANCE, False, -1.0)  # every error is above it
    with pytest.raises(ValueError, match="differs from the PyTorch engine.*m.onnx was not written"):
        to_onnx(tiny, path, "features", input_size=(32, 32), optimized_path=optimized)
    assert path.read_bytes() == b"previous model"
    assert optimized.read_bytes() == b"previous optimised model"
    assert _listing(tmp_path) == ["m.onnx", "m.opt.onnx"]  # no temporary files left


def test_write_failure_mid_save_leaves_previous_file_untouched(tiny, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous model")

    def disk_full(proto, f, *args, **kwargs):
        with open(f, "wb") as out:  # half a file, then the disk is full
            out.write(proto.SerializeToString()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        to_onnx(tiny, path, "features", input_size=(32, 32))
    assert path.read_bytes() == b"previous model"
    assert _listing(tmp_path) == ["m.onnx"]


def test_successful_export_replaces_the_file_and_a_stale_sidecar(tiny, tmp_path):
    path, optimized = tmp_path / "m.onnx", tmp_path / "opt" / "m.onnx"
    path.write_bytes(b"previous model")
    (tmp_path / "m.onnx.data").write_bytes(b"previous external weights")
    result = to_onnx(tiny, path, "features", input_size=(32, 32), optimized_path=str(optimized))
    assert _listing(tmp_path) == ["m.onnx", "opt"]  # the small model has no external data
    assert _listing(optimized.parent) == ["m.onnx"] and result.optimized_path == optimized
    x = images(2, 32, F32)
    assert torch.equal(OrtCAM(path)(x).classes, OrtCAM(optimized)(x).classes)


# --- what OrtCAM accepts -------------------------------------------------------------------------


def test_dynamic_file_refuses_inputs_below_its_minimum(tiny, tiny_dynamic):
    ort_cam = OrtCAM(tiny_dynamic.path)
    for size in [(1, 1), (3, 24), (32, 3)]:
        with pytest.raises(ValueError, match=r"below this file's minimum 4x4"):
            ort_cam(images(2, size, F32))
    x = images(2, (4, 4), F32)
    got = ort_cam(x)  # the smallest input: a 1x1 map
    want = ce.CAMEngine(tiny, "features", "cam")(x, got.classes)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    assert got.heatmaps.shape == (2, 2, 4, 4)


def test_fixed_file_refuses_other_sizes_channels_and_batches(tiny_classes, tmp_path):
    ort_cam = OrtCAM(tiny_classes.path)
    with pytest.raises(ValueError, match=r"takes 32x32 images \(no dynamic_size\), got 32x24"):
        ort_cam.run(images(2, (32, 24), F32), 1)
    with pytest.raises(ValueError, match="takes 3-channel images, got 1"):
        ort_cam.run(images(2, 32, F32)[:, :1], 1)
    fixed = to_onnx(TinyNet().eval(), tmp_path / "b2.onnx", "features", input_size=(32, 32),
                    dynamic_batch=False, batch_size=2, check=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"batches of 2 \(exported without dynamic_batch\)"):
        OrtCAM(fixed.path)(images(3, 32, F32))


@pytest.mark.parametrize(
    "classes,match",
    [
        (-1, "class index -1 out of range for 6 classes"),
        (torch.tensor([[1], [6]]), "class index 6 out of range"),
        (torch.tensor([[1.7], [2.0]]), "class ids must be integers"),
        (np.array([True, False]), "class ids must be integers"),
        (torch.zeros(3, 1, dtype=torch.long), r"do not fit a batch of 2"),
        (torch.zeros(2, 0, dtype=torch.long), r"no class \(K = 0\)"),
        (ce.TopK(1), "pass class ids .* not TopK"),
        (ce.BottomK(1), "pass class ids .* not BottomK"),
    ],
)
def test_run_validates_classes(tiny_classes, classes, match):
    with pytest.raises(ValueError, match=match):
        OrtCAM(tiny_classes.path).run(images(2, 32, F32), classes)


def test_run_broadcasts_class_ids_as_the_engine(tiny, tiny_classes):
    ort_cam = OrtCAM(tiny_classes.path)
    x = images(2, 32, F32)
    engine = ce.CAMEngine(tiny, "features", "gradcam")
    for classes, want in [
        (5, [[5], [5]]),
        (np.array([4, 0]), [[4], [0]]),
        ([[1, 5], [3, 3]], [[1, 5], [3, 3]]),
    ]:
        got = ort_cam.run(x, classes)
        assert got["classes"].tolist() == want
        ref = engine(x, torch.tensor(want))
        torch.testing.assert_close(got["heatmaps"], ref.heatmaps, rtol=0, atol=1e-4)
