"""int8 copies of an exported CAM model (ONNX Runtime quantisation) and the ORT node profiler.

The quantised files are checked on the trained demo model (ShapesNet, 64 px held-out shapes
images): on random weights int8 rounding is no guide to the error a real model sees.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import images
from test_export import small_vgg

from cam_engine.bench.ort_profile import overhead_table, profile_sessions
from cam_engine.demo import model as demo
from cam_engine.demo import shapes
from cam_engine.export import OrtCAM, quantize, to_onnx
from cam_engine.export.stages import stage


@pytest.fixture(scope="module")
def shapes_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize") / "shapes.onnx"
    to_onnx(demo.pretrained(), path, "features", topk=2, input_size=(64, 64), mean=(0, 0, 0),
            std=(1, 1, 1))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def held_out():
    return shapes.single(8, 64, seed=123).images.numpy()


def cam_part(graph) -> set[tuple[str, str]]:
    """(name, op) of the nodes of the CAM part (top-k, einsum, resize, min-max) of a graph."""
    return {(n.name, n.op_type) for n in graph.node if stage(n.name) in ("cam", "post")}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_maps_within_tolerance_of_float32(shapes_file, held_out, mode, tmp_path):
    calibration = [shapes.single(8, 64, seed=7).images.numpy()] if mode == "static" else None
    path = quantize(shapes_file, tmp_path / f"{mode}.onnx", mode, calibration)
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert ("QuantizeLinear" if mode == "static" else "ConvInteger") in ops
    # the CAM part (top-k, einsum, resize, min-max) is left as it was: float32 ops
    assert cam_part(onnx.load(str(shapes_file)).graph) <= cam_part(model.graph)
    fp32, int8 = OrtCAM(shapes_file)(held_out), OrtCAM(path)(held_out)
    assert int8.heatmaps.shape == (8, 2, 64, 64)
    assert int8.heatmaps.min() >= 0 and int8.heatmaps.max() <= 1
    # the top class of every held-out image survives int8 rounding, and its map stays close
    # (measured: mean 0.0037, max 0.066 static; mean 0.0023, max 0.034 dynamic)
    assert (int8.classes[:, 0] == fp32.classes[:, 0]).all()
    diff = abs(int8.heatmaps[:, 0] - fp32.heatmaps[:, 0])
    assert 0 < diff.mean() < 0.01 and diff.max() < 0.1


def test_weights_the_cam_part_reads_stay_float32(tmp_path):
    # VGG's MLP head: the CAM part gathers the last layer's rows and multiplies by every layer's
    # weight (its backward); dynamic quantisation rewrites each Gemm as a MatMul, which
    # transposed those shared weights for every reader before they got their own copies
    path = tmp_path / "vgg.onnx"
    to_onnx(small_vgg(), path, method="gradcam", input_size=(32, 32))
    x = images(3, 32, torch.float32).numpy()
    int8 = quantize(path, tmp_path / "int8.onnx", "dynamic")
    assert "MatMulInteger" in {node.op_type for node in onnx.load(str(int8)).graph.node}
    got, want = OrtCAM(int8)(x), OrtCAM(path)(x)
    assert got.heatmaps.shape == want.heatmaps.shape == (3, 1, 32, 32)
    # random weights: int8 moves the maps, but they stay those of the same classes
    assert (got.classes == want.classes).all()
    assert abs(got.heatmaps - want.heatmaps).mean() < 0.2


def test_quantize_refuses_bad_arguments(shapes_file, held_out, tmp_path):
    with pytest.raises(ValueError, match="unknown quantisation mode 'int4'"):
        quantize(shapes_file, tmp_path / "a.onnx", "int4")
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize(shapes_file, tmp_path / "a.onnx", "static")
    with pytest.raises(ValueError, match="takes no calibration"):
        quantize(shapes_file, tmp_path / "a.onnx", "dynamic", [held_out])
    with pytest.raises(ValueError, match="must differ"):
        quantize(shapes_file, shapes_file, "dynamic")
    assert not (tmp_path / "a.onnx").exists()


def test_stage_names():
    assert stage("/trunk/relu_3/Relu_output_0_nchwc") == "trunk"
    assert stage("/head/fc/Gemm") == stage("/layers.2/Gemm") == stage("/pools.0/MaxPool") == "head"
    assert stage("/post/Resize") == "post"
    assert stage("/Einsum") == stage("/TopK") == "cam"
    assert stage("ReorderOutput_token_7") == "layout"


def test_node_profile_accounts_for_every_node(shapes_file, held_out):
    feed = {"x": held_out[:2]}
    profiles = profile_sessions({"a": (shapes_file, feed), "b": (shapes_file, feed)}, runs=2)
    cam = profiles["b"]
    names = {node.name: node for node in cam.nodes}
    assert names["/post/Resize"].op == "Resize"
    assert any(stage(name) == "trunk" and node.op == "Conv" for name, node in names.items())
    assert sum(cam.by_stage().values()) == pytest.approx(cam.kernel_ms)
    assert cam.runs == 2 and cam.wall_ms > 0
    table = overhead_table(profiles["a"], cam)
    assert "| CAM model: post |" in table and "`/post/Resize` | Resize |" in table
    beyond = cam.kernel_ms - cam.by_stage()["trunk"]
    assert f"| CAM model, all but the trunk | {beyond:.1f} |" in table
