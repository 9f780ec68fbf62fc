"""The engine on a CUDA device: the same maps as on the CPU (compiled trunks, CUDA graphs and
channels-last trunk input included), bf16 autocast, and ONNX Runtime's CUDA provider with I/O
binding.

Skipped without a GPU (the development machines have none); ``scripts/gpu_checks.sh`` runs them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import images, make_model
from torch.testing import assert_close

import cam_engine as ce
from cam_engine.demo import model as demo
from cam_engine.demo import shapes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def resnet():
    return make_model("resnet18", dtype=torch.float32)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "eigencam"])
def test_cuda_maps_equal_cpu_maps(resnet, method):
    x = images(4, 64, dtype=torch.float32)
    expected = ce.CAMEngine(resnet, "layer4", method)(x, targets=ce.TopK(2))
    model = copy.deepcopy(resnet).cuda()
    res = ce.CAMEngine(model, "layer4", method)(x.cuda(), targets=expected.classes.cuda())
    assert res.heatmaps.is_cuda and res.cams.is_cuda
    assert_close(res.heatmaps.cpu(), expected.heatmaps, atol=1e-4, rtol=0)


def test_channels_last_trunk_on_cuda_equals_cpu_maps(resnet):
    x = images(4, 64, dtype=torch.float32)
    expected = ce.CAMEngine(resnet, "layer4", channels_last=False)(x, targets=ce.TopK(2))
    engine = ce.CAMEngine(copy.deepcopy(resnet).cuda(), "layer4", channels_last=True)
    assert engine.model.current().channels_last  # None (the default) is off on CUDA
    res = engine(x.cuda(), targets=expected.classes.cuda())
    assert_close(res.heatmaps.cpu(), expected.heatmaps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_trunk_on_cuda_equals_eager_call_after_call(resnet, mode):
    model = copy.deepcopy(resnet).cuda()
    eager = ce.CAMEngine(model, "layer4", "gradcam", closed_form=False)
    compiled = ce.CAMEngine(model, "layer4", "gradcam", closed_form=False, compile={"mode": mode})
    batches = [images(4, 64, dtype=torch.float32, seed=s).cuda() for s in (1, 2, 3)]
    kept = [compiled(x) for x in batches]  # CUDA graphs replay into the same buffers
    for x, res in zip(batches, kept, strict=True):
        assert_close(res.heatmaps, eager(x, targets=res.classes).heatmaps, atol=1e-3, rtol=0)


def test_bf16_autocast_on_cuda_stays_close_on_the_trained_demo_model():
    model = demo.pretrained().eval()
    x = shapes.single(32, seed=5).images
    expected = ce.CAMEngine(copy.deepcopy(model).double(), method="gradcam")(x.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = ce.CAMEngine(model.cuda(), method="gradcam")(x.cuda(), expected.classes.cuda())
    error = (res.heatmaps.double().cpu() - expected.heatmaps).abs()
    assert error.max() < 0.05 and error.mean() < 5e-3


def test_onnx_runtime_cuda_provider_binds_gpu_tensors(resnet, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    path = tmp_path / "resnet.onnx"
    ce.export.to_onnx(resnet, path, "layer4", method="cam", input_size=(64, 64))
    session = ce.export.OrtCAM(path, device="cuda")
    assert session.on_gpu
    x = images(4, 64, dtype=torch.float32)
    res = session(x.cuda())
    assert res.heatmaps.is_cuda  # bound in GPU memory, no host round trip
    expected = ce.CAMEngine(resnet, "layer4", "cam")(x, targets=res.classes.cpu())
    assert_close(res.heatmaps.cpu(), expected.heatmaps, atol=1e-3, rtol=0)
