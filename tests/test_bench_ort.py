"""The ONNX Runtime rows of the benchmark: top-3 maps and the int8 copies of the CAM model."""

from __future__ import annotations

import onnx
import pytest
from torch.testing import assert_close

import cam_engine as ce
from cam_engine.bench import backends as bk
from cam_engine.demo import model as demo
from cam_engine.demo import shapes


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The trained demo model (a small CNN) on held-out 64 px shapes images."""
    x = shapes.single(2, 64, seed=123).images
    workdir = tmp_path_factory.mktemp("models")
    return bk.Case(demo.pretrained(), "features", "gradcam", x, workdir, "shapes-b2-64", "fc")


def test_top3_row_computes_the_engines_three_maps(case):
    ready = bk.get("ort-cam-top3").prepare(case)
    res = ready.run(case.x)
    expected = ce.CAMEngine(case.model, case.layer, "gradcam")(case.x, ce.TopK(3))
    assert res.heatmaps.shape == (2, 3, 64, 64)
    assert_close(res.heatmaps, expected.heatmaps, atol=2e-4, rtol=0)
    assert ready.heatmaps(res).shape == (2, 1, 64, 64)  # the harness checks the top-1 map


@pytest.mark.parametrize(("backend", "op"), [("ort-cam-int8", "QuantizeLinear"),
                                             ("ort-cam-int8-dynamic", "ConvInteger")])  # fmt: skip
def test_int8_rows_run_a_quantised_copy(case, backend, op):
    ready = bk.get(backend).prepare(case)
    maps = ready.heatmaps(ready.run(case.x))
    assert maps.shape == (2, 1, 64, 64) and 0 <= maps.min() and maps.max() <= 1
    mode = backend.removeprefix("ort-cam-int8").lstrip("-") or "static"
    (path,) = case.workdir.glob(f"*-gradcam-cam-int8-{mode}.onnx")
    assert op in {node.op_type for node in onnx.load(str(path)).graph.node}
