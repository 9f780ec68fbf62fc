"""OpenVINO as a runtime of the exported CAM file: OvCAM against OrtCAM on the same files.

Two tiny files: the shapes model (GAP -> linear head, CAM, top-2, any size) and a small VGG
(pool -> MLP head, Grad-CAM written into the graph, a classes input), exported without the
self-check (OrtCAM is the reference here).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_export import small_vgg

import cam_engine as ce
from cam_engine import TopK
from cam_engine.bench import backends as bk
from cam_engine.demo import shapes
from cam_engine.demo.model import pretrained
from cam_engine.export import OrtCAM, OvCAM, to_onnx

pytest.importorskip("openvino", reason="OpenVINO is optional: pip install 'cam-engine[openvino]'")

TOL = 1e-5
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ov")
    plain = {"input_size": (64, 64), "mean": (0, 0, 0), "std": (1,) * 3, "check": False}
    to_onnx(pretrained().eval(), folder / "shapes.onnx", "features", topk=2, dynamic_size=True,
            **plain)  # fmt: skip
    to_onnx(small_vgg(), folder / "vgg.onnx", "features", method="gradcam", classes_input=True,
            **plain)  # fmt: skip
    return {"shapes": folder / "shapes.onnx", "vgg": folder / "vgg.onnx"}


def _assert_same(got, want) -> None:
    assert np.asarray(want.heatmaps).max() == 1  # maps with contrast, not flat zeros
    np.testing.assert_array_equal(np.asarray(got.classes), np.asarray(want.classes))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(got.heatmaps), np.asarray(want.heatmaps), rtol=0, atol=TOL
    )


def test_top_k_file_matches_ortcam(files):
    x = shapes.single(2, size=64, seed=1).images  # (2, 3, 64, 64) in [0, 1]
    ov, ort = OvCAM(files["shapes"]), OrtCAM(files["shapes"], providers=CPU)
    assert ov.topk == 2 and ov.metadata == ort.metadata and ov.providers == ["OpenVINO:CPU"]
    res = ov(x.numpy())  # NumPy in, NumPy out
    assert isinstance(res.heatmaps, np.ndarray) and res.heatmaps.shape == (2, 2, 64, 64)
    _assert_same(res, ort(x))
    # another size (the file has dynamic_size) and the first map only
    y = torch.nn.functional.interpolate(x, size=(48, 80), mode="bilinear")
    res = ov(y, targets=TopK(1))
    assert isinstance(res.heatmaps, torch.Tensor) and res.heatmaps.shape == (2, 1, 48, 80)
    _assert_same(res, ort(y, targets=TopK(1)))


def test_classes_input_file_matches_ortcam(files):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ov, ort = OvCAM(files["vgg"]), OrtCAM(files["vgg"], providers=CPU)
    _assert_same(ov(x, targets=[[3, 7], [0, 11]]), ort(x, targets=[[3, 7], [0, 11]]))
    outputs = ov.run(x.numpy(), targets=5)
    assert outputs["classes"].tolist() == [[5], [5]]
    np.testing.assert_allclose(
        outputs["heatmaps"], ort.run(x.numpy(), targets=5)["heatmaps"], rtol=0, atol=TOL
    )


def test_inputs_are_checked_as_ortcam_does(files, tmp_path):
    ov = OvCAM(files["vgg"])
    with pytest.raises(ValueError, match="takes 64x64 images"):
        ov(torch.zeros(1, 3, 32, 32), targets=1)
    with pytest.raises(ValueError, match="explains given classes"):
        ov(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="class index 12 out of range"):
        ov(torch.zeros(1, 3, 64, 64), targets=12)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 1, 1), (torch.zeros(1, 3, 8, 8),), plain, dynamo=False)
    with pytest.raises(ValueError, match="has no 'cam_engine' metadata"):
        OvCAM(plain)


def test_missing_openvino_says_how_to_install(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ImportError, match=r"cam-engine\[openvino\]"):
        OvCAM(files["shapes"])


def test_bench_backends_compute_the_engines_maps_and_logits(tmp_path):
    model = pretrained().eval()
    x = shapes.single(2, size=64, seed=2).images
    case = bk.Case(model, "features", "cam", x, tmp_path, "shapes", bk.fc_name(model, "features"))
    # the files the backends would write (ort-cam's and ort-plain's, tested in test_bench), made
    # here the quick way: no self-check, the TorchScript exporter
    to_onnx(model, tmp_path / "shapes-cam-cam.onnx", "features", topk=1, input_size=(64, 64),
            check=False)  # fmt: skip
    torch.onnx.export(model, (x,), tmp_path / "shapes-plain.onnx", dynamo=False)
    ready = bk.get("ov-cam").prepare(case)
    expected = ce.CAMEngine(model, "features", "cam")(x).heatmaps
    assert expected.amax() == 1
    torch.testing.assert_close(ready.heatmaps(ready.run(x)), expected, atol=TOL, rtol=0)
    plain = bk.get("ov-plain").prepare(case)
    with torch.no_grad():
        torch.testing.assert_close(plain.run(x), model(x), atol=1e-4, rtol=1e-4)
