"""cam-ort, the C++ ONNX Runtime runner: built with CMake, checked against OrtCAM on the same files.

The runner is built once per session (scripts/native/build.sh, into build/native or
$CAM_ORT_BUILD); the reference is the Python ONNX Runtime session (:class:`OrtCAM`) on the same
model file, and torch's antialiased resize for the preprocessing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from cam_engine import overlay
from cam_engine.demo import shapes
from cam_engine.demo.model import pretrained
from cam_engine.export import OrtCAM, to_onnx

ROOT = Path(__file__).resolve().parents[1]
COMPILERS = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
_missing = [
    what
    for what, found in (
        ("CMake", shutil.which("cmake")),
        (
            "a C++ compiler (c++, g++, clang++ or $CXX)",
            any(c and shutil.which(c) for c in COMPILERS),
        ),
    )
    if not found
]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"the native runner needs {' and '.join(_missing)}"
)
TOL = 1e-5


@pytest.fixture(scope="session")
def cam_ort() -> Path:
    """The built runner (incremental: later sessions only relink what changed)."""
    build = Path(os.environ.get("CAM_ORT_BUILD", ROOT / "build" / "native"))
    env = {**os.environ, "PYTHON": sys.executable, "JOBS": os.environ.get("JOBS", "2")}
    done = subprocess.run(
        [str(ROOT / "scripts" / "native" / "build.sh"), str(build)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        pytest.fail(f"building cam-ort failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return build / "cam-ort"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """name -> (ONNX file, example inputs (3, 3, 64, 64) float32)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("onnx")
    resnet = make_model("resnet18", dtype=torch.float32)
    to_onnx(resnet, folder / "resnet18.onnx", input_size=(64, 64), topk=2)
    demo = pretrained().eval()
    plain = {"target_layer": "features", "input_size": (64, 64), "mean": (0, 0, 0), "std": (1,) * 3}
    to_onnx(demo, folder / "shapes.onnx", **plain)
    to_onnx(
        demo,
        folder / "shapes_fixed.onnx",
        topk=2,
        classes_input=True,
        dynamic_batch=False,
        batch_size=2,
        **plain,
    )
    noise = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    pictures = shapes.single(3, size=64, seed=5).images
    return {
        "resnet18": (folder / "resnet18.onnx", noise),
        "shapes": (folder / "shapes.onnx", pictures),
        "shapes_fixed": (folder / "shapes_fixed.onnx", pictures),
    }


def run(cam_ort: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(cam_ort), *map(str, args), "--threads", "1"], capture_output=True, text=True
    )
    if check and done.returncode != 0:
        pytest.fail(f"cam-ort {' '.join(map(str, args))} failed: {done.stderr}")
    return done


def predictions(out: Path) -> dict[str, list[tuple[int, float]]]:
    """predictions.tsv: name -> [(class, logit), ...]."""
    table = {}
    for line in (out / "predictions.tsv").read_text().splitlines():
        name, *pairs = line.split("\t")
        table[name] = [(int(c), float(v)) for c, v in (p.split(":") for p in pairs)]
    return table


def read_ppm(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of a binary PPM without comments (what cam-ort writes)."""
    data = path.read_bytes()
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    assert magic == b"P6" and maxval == b"255"
    return np.frombuffer(pixels, np.uint8).reshape(int(height), int(width), 3)


def write_pnm(path: Path, picture: torch.Tensor) -> None:
    """(3, H, W) RGB -> P6, or (H, W) grey -> P5, uint8."""
    magic = b"P5" if picture.ndim == 2 else b"P6"
    pixels = picture if picture.ndim == 2 else picture.permute(1, 2, 0)
    height, width = picture.shape[-2:]
    path.write_bytes(b"%s\n%d %d\n255\n" % (magic, width, height) + pixels.numpy().tobytes())


@pytest.mark.parametrize("name", ["resnet18", "shapes"])
def test_npy_inputs_match_ortcam(cam_ort, models, tmp_path, name):
    path, x = models[name]
    np.save(tmp_path / "x.npy", x.numpy())
    run(cam_ort, path, tmp_path / "x.npy", "--out", tmp_path / "out", "--batch", "2")
    ref = OrtCAM(path, providers=["CPUExecutionProvider"])(x)
    table = predictions(tmp_path / "out")
    for b in range(len(x)):
        got = np.load(tmp_path / "out" / f"x_{b}.heatmaps.npy")
        assert got.shape == tuple(ref.heatmaps.shape[1:])
        np.testing.assert_allclose(got, ref.heatmaps[b].numpy(), rtol=0, atol=TOL)
        classes, logits = zip(*table[f"x_{b}"], strict=True)
        assert list(classes) == ref.classes[b].tolist()
        want = ref.logits[b, ref.classes[b]].numpy()
        np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)


def test_images_preprocessed_from_metadata(cam_ort, models, tmp_path):
    """PPM / PGM of another size: resized (antialiased bilinear) and normalised with the
    metadata's mean / std as torch does it; heatmaps and overlays as the Python side's."""
    path, _ = models["resnet18"]
    meta = OrtCAM(path, providers=["CPUExecutionProvider"]).metadata
    pictures = (shapes.single(2, size=96, seed=7).images[..., 8:88, :] * 255).round().byte()
    write_pnm(tmp_path / "rgb.ppm", pictures[0])  # 80 x 96: shrunk to 64 x 64
    write_pnm(tmp_path / "grey.pgm", pictures[1, 1])
    out = tmp_path / "out"
    run(cam_ort, path, tmp_path / "rgb.ppm", tmp_path / "grey.pgm", "--out", out, "--save-input")

    rgb = torch.stack([pictures[0], pictures[1, 1].expand(3, -1, -1)]).float() / 255
    small = F.interpolate(rgb, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    want = (small - mean) / std
    got = torch.stack([torch.from_numpy(np.load(out / f"{n}.input.npy")) for n in ("rgb", "grey")])
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)

    ref = OrtCAM(path, providers=["CPUExecutionProvider"])(got)
    table = predictions(out)
    colours = overlay(got * std + mean, ref.heatmaps)  # (B, K, 3, H, W) uint8, jet
    for b, name in enumerate(("rgb", "grey")):
        maps = np.load(out / f"{name}.heatmaps.npy")
        np.testing.assert_allclose(maps, ref.heatmaps[b].numpy(), rtol=0, atol=TOL)
        assert [c for c, _ in table[name]] == ref.classes[b].tolist()
        for j, c in enumerate(ref.classes[b].tolist()):
            drawn = torch.from_numpy(read_ppm(out / f"{name}.{c}.ppm").copy()).permute(2, 0, 1)
            # one level: a map value at a rounding boundary may pick the next colour
            assert (drawn.int() - colours[b, j].int()).abs().max() <= 1


def test_fixed_batch_and_given_classes(cam_ort, models, tmp_path):
    """A file with batch 2 and a classes input: 3 inputs run as 2 + 1 (padded) batches."""
    path, x = models["shapes_fixed"]
    np.save(tmp_path / "x.npy", x.numpy())
    run(cam_ort, path, tmp_path / "x.npy", "--out", tmp_path / "out", "--classes", "3,1")
    session = OrtCAM(path, providers=["CPUExecutionProvider"])
    padded = torch.cat([x, x[-1:]])
    ref = torch.cat([session(padded[i : i + 2], targets=[[3, 1]] * 2).heatmaps for i in (0, 2)])
    for b in range(len(x)):
        got = np.load(tmp_path / "out" / f"x_{b}.heatmaps.npy")
        np.testing.assert_allclose(got, ref[b].numpy(), rtol=0, atol=TOL)
        assert [c for c, _ in predictions(tmp_path / "out")[f"x_{b}"]] == [3, 1]


def test_bench_reports_percentiles(cam_ort, models, tmp_path):
    path, x = models["shapes"]
    np.save(tmp_path / "x.npy", x.numpy())
    done = run(
        cam_ort, path, tmp_path / "x.npy", "--out", tmp_path, "--bench", "5", "--warmup", "1"
    )
    line = next(s for s in done.stdout.splitlines() if s.startswith("bench:"))
    assert "batch 3x3x64x64, 5 runs" in line
    p50, p90, p99 = (float(re.search(rf"{p} ([\d.]+) ms", line)[1]) for p in ("p50", "p90", "p99"))
    assert 0 < p50 <= p90 <= p99
    assert float(re.search(r"([\d.]+) images/s", line)[1]) > 0


def _npy(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    np.save(tmp_path / name, array)
    return tmp_path / name


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file: "),
        ("channels", "expected a float32 (B, 3, H, W) or (3, H, W) array"),
        ("float64", "expected a float32 array ('<f4')"),
        ("size", "input is 32x32 but the model takes 64x64"),
        ("not-an-image", "not a binary PPM (P6) or PGM (P5) image"),
        ("provider", "unknown provider 'tpu'; available: cpu, cuda, tensorrt"),
        ("classes", "--classes needs a model exported with classes_input=True"),
        ("no-metadata", "has no 'cam_engine' metadata"),
    ],
)
def test_errors_are_clear(cam_ort, models, tmp_path, case, message):
    path, _ = models["shapes"]
    good = _npy(tmp_path, "x.npy", np.zeros((3, 64, 64), np.float32))
    args = {
        "missing": [path, tmp_path / "nothing.ppm"],
        "channels": [path, _npy(tmp_path, "c.npy", np.zeros((4, 64, 64), np.float32))],
        "float64": [path, _npy(tmp_path, "d.npy", np.zeros((3, 64, 64)))],
        "size": [path, _npy(tmp_path, "s.npy", np.zeros((3, 32, 32), np.float32))],
        "not-an-image": [path, tmp_path / "x.npy.ppm"],
        "provider": [path, good, "--provider", "tpu"],
        "classes": [path, good, "--classes", "1"],
        "no-metadata": [_plain_onnx(tmp_path), good],
    }[case]
    (tmp_path / "x.npy.ppm").write_bytes(good.read_bytes())
    done = run(cam_ort, *args, "--out", tmp_path / "out", check=False)
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.startswith("cam-ort: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_unavailable_provider_says_so(cam_ort, models, tmp_path):
    path, x = models["shapes"]
    np.save(tmp_path / "x.npy", x.numpy())
    done = run(
        cam_ort, path, tmp_path / "x.npy", "--provider", "cuda", "--out", tmp_path, check=False
    )
    assert done.returncode == 2
    assert re.search(r"provider cuda .*not available|cannot start provider cuda", done.stderr)


def _plain_onnx(tmp_path: Path) -> Path:
    """A valid ONNX model without cam-engine metadata."""
    path = tmp_path / "plain.onnx"
    torch.onnx.export(
        torch.nn.Conv2d(3, 1, 1), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False
    )
    return path
