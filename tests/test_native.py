"""cam-ort, the C++ ONNX Runtime runner: built with CMake, checked against OrtCAM on the same files.

The runner is built once per session (scripts/native/build.sh, into build/native or
$CAM_ORT_BUILD); the reference is the Python ONNX Runtime session (:class:`OrtCAM`) on the same
model file, torchvision's decoders and torch's antialiased resize for the preprocessing, and
:func:`cam_engine.postprocess.heatmaps` (explain's rule) for maps at a picture's own size.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, write_jpeg, write_png

from cam_engine import overlay
from cam_engine.demo import shapes
from cam_engine.demo.model import pretrained
from cam_engine.export import OrtCAM, to_onnx
from cam_engine.postprocess import heatmaps

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
    to_onnx(demo, folder / "shapes_maps.onnx", topk=2, upsample=False, check=False, **plain)
    noise = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    pictures = shapes.single(3, size=64, seed=5).images
    return {
        "resnet18": (folder / "resnet18.onnx", noise),
        "shapes": (folder / "shapes.onnx", pictures),
        "shapes_fixed": (folder / "shapes_fixed.onnx", pictures),
        "shapes_maps": (folder / "shapes_maps.onnx", pictures),  # (B, K, h, w) maps
    }


def run(cam_ort: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(cam_ort), *map(str, args), "--threads", "1"], capture_output=True, text=True
    )
    if check and done.returncode != 0:
        pytest.fail(f"cam-ort {' '.join(map(str, args))} failed: {done.stderr}")
    return done


def predictions(out: Path) -> dict[str, list[tuple[int, float, float]]]:
    """predictions.tsv: name -> [(class, probability, logit), ...] in the file's order."""
    header, *rows = (out / "predictions.tsv").read_text().splitlines()
    assert header == "image\tclass\tprobability\tlogit"
    table: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        name, c, p, logit = row.split("\t")
        table.setdefault(name, []).append((int(c), float(p), float(logit)))
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
        classes, probabilities, logits = zip(*table[f"x_{b}"], strict=True)
        assert list(classes) == ref.classes[b].tolist()
        want = ref.logits[b, ref.classes[b]].numpy()
        np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
        want = ref.logits[b].double().softmax(0)[ref.classes[b]].numpy()
        np.testing.assert_allclose(probabilities, want, rtol=1e-6, atol=1e-7)


def test_images_preprocessed_from_metadata(cam_ort, models, tmp_path):
    """PPM / PGM of another size: resized (antialiased bilinear) and normalised with the
    metadata's mean / std as torch does it; heatmaps and overlays at the model's size
    (--model-size) as the Python side's."""
    path, _ = models["resnet18"]
    meta = OrtCAM(path, providers=["CPUExecutionProvider"]).metadata
    pictures = (shapes.single(2, size=96, seed=7).images[..., 8:88, :] * 255).round().byte()
    write_pnm(tmp_path / "rgb.ppm", pictures[0])  # 80 x 96: shrunk to 64 x 64
    write_pnm(tmp_path / "grey.pgm", pictures[1, 1])
    out = tmp_path / "out"
    ppm, pgm = tmp_path / "rgb.ppm", tmp_path / "grey.pgm"
    run(cam_ort, path, ppm, pgm, "--out", out, "--save-input", "--model-size")

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
        assert [row[0] for row in table[name]] == ref.classes[b].tolist()
        for j, c in enumerate(ref.classes[b].tolist()):
            drawn = torch.from_numpy(read_ppm(out / f"{name}.{c}.ppm").copy()).permute(2, 0, 1)
            # one level: a map value at a rounding boundary may pick the next colour
            assert (drawn.int() - colours[b, j].int()).abs().max() <= 1


def test_png_and_jpeg_at_their_own_size(cam_ort, models, tmp_path):
    """PNG and JPEG pictures of 80x96 (the model takes 64x64): decoded as torchvision decodes
    them; maps from the file's (h, w) maps to the picture's size as explain makes them
    (postprocess.heatmaps), overlays over the picture; --model-size gives the file's maps, the
    same from the pictures as from their inputs saved as .npy, and OrtCAM's."""
    path, _ = models["shapes_maps"]
    picture = (shapes.single(1, size=96, seed=7).images[0, :, 8:88] * 255).round().byte()
    files = {"p": tmp_path / "p.png", "j": tmp_path / "j.jpg"}
    write_png(picture, str(files["p"]))
    write_jpeg(picture, str(files["j"]), quality=90)
    out, model_size, npy = tmp_path / "out", tmp_path / "model_size", tmp_path / "npy"
    run(cam_ort, path, *files.values(), "--out", out, "--save-input")
    run(cam_ort, path, *files.values(), "--out", model_size, "--model-size")
    saved = [out / f"{name}.input.npy" for name in files]
    run(cam_ort, path, *saved, "--out", npy, "--model-size")
    session = OrtCAM(path, providers=["CPUExecutionProvider"])
    table = predictions(out)
    for name, file in files.items():
        decoded = decode_image(str(file), ImageReadMode.RGB)  # (3, 80, 96) uint8
        want = F.interpolate(decoded[None] / 255, size=(64, 64), mode="bilinear", antialias=True)
        x = torch.from_numpy(np.load(out / f"{name}.input.npy"))[None]
        if name == "p":
            torch.testing.assert_close(x, want, rtol=0, atol=TOL)
        else:  # stb_image's JPEG decoder is not libjpeg's: a few pixels a level or more off
            torch.testing.assert_close(x, want, rtol=0, atol=3 / 255)
            assert (x - want).abs().mean() < 0.25 / 255
        ref = session(x)
        maps = heatmaps(ref.heatmaps, (80, 96))  # (1, K, 80, 96)
        got = np.load(out / f"{name}.heatmaps.npy")
        assert got.shape == (2, 80, 96) and maps.amax() == 1
        np.testing.assert_allclose(got, maps[0].numpy(), rtol=0, atol=TOL)
        for small in (model_size / f"{name}.heatmaps.npy", npy / f"{name}.input.heatmaps.npy"):
            np.testing.assert_allclose(np.load(small), ref.heatmaps[0].numpy(), rtol=0, atol=TOL)
        colours = overlay(decoded[None], maps)[0]  # (K, 3, 80, 96)
        classes, probabilities, _ = zip(*table[name], strict=True)
        assert list(classes) == ref.classes[0].tolist()
        want = ref.logits[0].double().softmax(0)[ref.classes[0]].numpy()
        np.testing.assert_allclose(probabilities, want, rtol=1e-6, atol=1e-7)
        for j, c in enumerate(classes):
            drawn = torch.from_numpy(read_ppm(out / f"{name}.{c}.ppm").copy()).permute(2, 0, 1)
            assert drawn.shape == (3, 80, 96)
            # a level at a rounding boundary; JPEG: half of the decoders' 3 levels, too
            assert (drawn.int() - colours[j].int()).abs().max() <= (1 if name == "p" else 3)


def test_grey_palette_and_rgba_png_read_as_rgb(cam_ort, models, tmp_path):
    """Grey, palette and RGBA PNGs give the model the RGB input of torchvision's RGB decoding
    (grey copied to the channels, the palette looked up, alpha dropped)."""
    path, _ = models["shapes"]
    rgb = (shapes.single(1, size=64, seed=3).images[0] * 255).round().byte().permute(1, 2, 0)
    alpha = np.random.default_rng(0).integers(0, 256, (64, 64, 1), dtype=np.uint8)
    pictures = {
        "grey": Image.fromarray(rgb.numpy()).convert("L"),
        "palette": Image.fromarray(rgb.numpy()).quantize(16),
        "rgba": Image.fromarray(np.concatenate([rgb.numpy(), alpha], axis=2), "RGBA"),
    }
    for name, picture in pictures.items():
        picture.save(tmp_path / f"{name}.png")
    files = [tmp_path / f"{name}.png" for name in pictures]
    run(cam_ort, path, *files, "--out", tmp_path / "out", "--save-input")
    for file in files:
        want = decode_image(str(file), ImageReadMode.RGB) / 255
        got = torch.from_numpy(np.load(tmp_path / "out" / f"{file.stem}.input.npy"))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_build_folder_runs_when_copied(cam_ort, models, tmp_path):
    """The build folder carries the ONNX Runtime library (a file, not a link into a virtualenv)
    and cam-ort finds it through its run path ($ORIGIN): a copy runs with no LD_LIBRARY_PATH."""
    build, copy = cam_ort.parent, tmp_path / "elsewhere"
    copy.mkdir()
    library = build / "libonnxruntime.so.1"
    assert library.is_file() and not library.is_symlink()
    # the CUDA / TensorRT provider libraries (hundreds of MB) are not needed on the CPU
    for file in [cam_ort, library, *build.glob("libonnxruntime_providers_shared.so")]:
        shutil.copy2(file, copy)
    env = {"PATH": os.environ.get("PATH", ""), "LD_LIBRARY_PATH": ""}
    linked = subprocess.run(["ldd", copy / "cam-ort"], capture_output=True, text=True, env=env)
    assert f"libonnxruntime.so.1 => {copy}/libonnxruntime.so.1" in linked.stdout
    path, x = models["shapes"]
    np.save(tmp_path / "x.npy", x[:1].numpy())
    done = subprocess.run(
        [copy / "cam-ort", path, tmp_path / "x.npy", "--out", tmp_path / "out", "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    ref = OrtCAM(path, providers=["CPUExecutionProvider"])(x[:1])
    got = np.load(tmp_path / "out" / "x.heatmaps.npy")
    np.testing.assert_allclose(got, ref.heatmaps[0].numpy(), rtol=0, atol=TOL)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_native_installs_no_python_environment(tmp_path):
    done = subprocess.run(
        # --no-print-directory: under `make test` the outer make's MAKELEVEL reaches this one
        ["make", "--no-print-directory", "-n", "native", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == ["scripts/native/build.sh build/native"]


def test_without_the_wheel_fetch_ort_says_what_to_set(tmp_path):
    """A Python without onnxruntime (here one that fails every command): the script stops and
    names ONNXRUNTIME_ROOT and onnxruntime_DIR."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    script = ROOT / "scripts" / "native" / "fetch_ort.sh"
    done = subprocess.run([script, tmp_path / "ort", python], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"fetch_ort: no onnxruntime Python package for {python}")
    assert "ONNXRUNTIME_ROOT=<prefix with include/ and lib/>" in done.stderr
    assert "onnxruntime_DIR=<folder of onnxruntimeConfig.cmake>" in done.stderr


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
        assert [row[0] for row in predictions(tmp_path / "out")[f"x_{b}"]] == [3, 1]


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
        ("not-an-image", "not a PNG, JPEG, binary PPM (P6) or PGM (P5) image"),
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


def _npy_file(header: str, data: bytes = b"", version: int = 1, length: int | None = None) -> bytes:
    """A .npy file with the given header dict text, padded as numpy pads it (data at a multiple
    of 64 bytes); `length` overrides the header length field."""
    prefix = 10 if version == 1 else 12
    text = header + " " * (-(prefix + len(header) + 1) % 64) + "\n"
    size = (len(text) if length is None else length).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + text.encode() + data


def _npy_shape(shape: str, data: bytes = b"", descr: str = "'<f4'", order: str = "False") -> bytes:
    return _npy_file(f"{{'descr': {descr}, 'fortran_order': {order}, 'shape': {shape}, }}", data)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data).to_bytes(4, "big")
    return len(data).to_bytes(4, "big") + kind + data + crc


def _png(*chunks: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _png_chunk(b"IEND", b"")


_PIXELS = bytes(64 * 64 * 3)
# name -> (file contents, what the one-line error says after "<path>: ")
HOSTILE = {
    # 128 bytes; the shape's element count wraps to 0 in 64 bits
    "overflow.npy": (
        _npy_shape("(4611686018427387904, 3, 4, 4)"),
        "shape (4611686018427387904, 3, 4, 4) is too large (its byte count overflows 64 bits)",
    ),
    "short-data.npy": (
        _npy_shape("(3, 64, 64)", bytes(100)),
        "shape (3, 64, 64) needs 49152 bytes of float32 data, the file has 100",
    ),
    "long-data.npy": (
        _npy_shape("(3, 64, 64)", bytes(49156)),
        "shape (3, 64, 64) needs 49152 bytes of float32 data, the file has 49156",
    ),
    "prefix-only.npy": (b"\x93NUMPY\x01\x00", "the file ends inside its .npy header length"),
    "magic.npy": (b"\x93NUMPZ\x01\x00" + bytes(120), "not a .npy file (no \\x93NUMPY magic)"),
    "version.npy": (
        _npy_file("{}", version=9),
        "unsupported .npy format version 9.0 (1.0, 2.0 and 3.0 are read)",
    ),
    "header-past-eof.npy": (
        b"\x93NUMPY\x01\x00\xff\xff",
        "header length 65535 runs past the end of the file (10 bytes)",
    ),
    "header-past-eof-v2.npy": (
        _npy_file("{}", version=2, length=0xFFFFFFF0),
        "header length 4294967280 runs past the end of the file (64 bytes)",
    ),
    "not-a-dict.npy": (_npy_file("garbage"), "bad .npy header: expected '{' at character 0"),
    "unclosed.npy": (
        _npy_file("{'descr': '<f4'"),
        "bad .npy header: expected ',' or '}' at character 15",
    ),
    "negative.npy": (
        _npy_shape("(-1, 3, 64, 64)"),
        "bad .npy header: shape entries must be non-negative integers, got '-1'",
    ),
    "text-dim.npy": (
        _npy_shape("('a', 3, 64, 64)"),
        "bad .npy header: shape entries must be non-negative integers, got ''a''",
    ),
    "big-dim.npy": (
        _npy_shape("(99999999999999999999, 3)"),
        "bad .npy header: shape entry 99999999999999999999 is too large",
    ),
    "no-shape.npy": (
        _npy_file("{'descr': '<f4', 'fortran_order': False}"),
        "bad .npy header: no 'shape' entry",
    ),
    "unknown-key.npy": (
        _npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (), 'x': 1}"),
        "bad .npy header: unknown key 'x'",
    ),
    "fortran.npy": (
        _npy_shape("(3, 64, 64)", bytes(49152), order="True"),
        "Fortran-order arrays are not supported",
    ),
    "int8.npy": (
        _npy_shape("(3,)", bytes(3), descr="'|i1'"),
        "expected a float32 array ('<f4'), got '|i1'",
    ),
    "empty.npy": (
        _npy_shape("(0, 3, 64, 64)"),
        "expected a float32 (B, 3, H, W) or (3, H, W) array with no empty dimension, "
        "got shape (0, 3, 64, 64)",
    ),
    # 29 bytes that claim 10.8 GB of pixels
    "huge.ppm": (
        b"P6\n60000 60000\n255\n" + bytes(10),
        "a 60000x60000 P6 image with maximum value 255 needs 10800000000 bytes of pixels, "
        "the file has 10",
    ),
    "overflow.ppm": (
        b"P6\n2147483647 2147483647\n65535\n",
        "a 2147483647x2147483647 P6 image with maximum value 65535 is too large "
        "(its byte count overflows 64 bits)",
    ),
    "short-pixels.ppm": (
        b"P6\n64 64\n255\n" + bytes(100),
        "a 64x64 P6 image with maximum value 255 needs 12288 bytes of pixels, the file has 100",
    ),
    "short-pixels-16bit.pgm": (
        b"P5\n64 64\n65535\n" + bytes(4096),
        "a 64x64 P5 image with maximum value 65535 needs 8192 bytes of pixels, the file has 4096",
    ),
    "header-eof.ppm": (b"P6\n64 64\n", "the file ends before its maximum value"),
    "empty.ppm": (b"", "not a PNG, JPEG, binary PPM (P6) or PGM (P5) image (starts '')"),
    "ascii.ppm": (
        b"P3\n1 1\n255\n0 0 0\n",
        "not a PNG, JPEG, binary PPM (P6) or PGM (P5) image (starts 'P3')",
    ),
    "glued.ppm": (b"P664 64 255\n" + _PIXELS, "no whitespace after the magic number 'P6'"),
    "maxval-0.pgm": (b"P5\n4 4\n0\n" + bytes(16), "maximum value 0 is out of range 1..65535"),
    "maxval-big.pgm": (
        b"P5\n4 4\n70000\n" + bytes(32),
        "maximum value 70000 is out of range 1..65535",
    ),
    "negative.ppm": (b"P6\n-64 64\n255\n" + _PIXELS, "bad width '-64'"),
    "text.ppm": (b"P6\n64 abc\n255\n" + _PIXELS, "bad height 'abc'"),
    "zero.ppm": (b"P6\n0 64\n255\n", "width 0 is out of range 1..2147483647"),
    "wide.ppm": (
        b"P6\n99999999999999999999 1\n255\n",
        "width 99999999999999999999 is out of range 1..2147483647",
    ),
    "above-maxval.pgm": (
        b"P5\n64 64\n100\n" + bytes([255]) * 4096,
        "sample value 255 is above the maximum value 100",
    ),
    # 45 bytes that claim 90 million pixels: refused before the decoder allocates them
    "huge.png": (
        _png(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 9000, 8, 2, 0, 0, 0))),
        "a 10000x9000 image is over the 89478485 pixels decoded",
    ),
    "cut.png": (
        _png(
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)),
            # a zlib stream of one stored block of 5 bytes: 4 rows of 13 are needed
            _png_chunk(b"IDAT", b"\x78\x01\x01\x05\x00\xfa\xff" + bytes(5)),
        ),
        "cannot decode the image (not enough pixels)",
    ),
    "bad.jpg": (b"\xff\xd8\xff" + bytes(20), "cannot read the image header (unknown image type)"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_fail_cleanly(cam_ort, models, tmp_path, name):
    """Each malformed file stops the run with exit code 2 and one line naming the file and what
    is wrong: never a crash signal, never an allocation from an unchecked header."""
    contents, message = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(contents)
    done = run(cam_ort, models["shapes"][0], path, "--out", tmp_path / "out", check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"cam-ort: error: {path}: {message}\n"


def test_pnm_comments_and_16_bit_samples(cam_ort, models, tmp_path):
    """'#' comments anywhere in the header (also right after the maximum value) and 16-bit
    big-endian samples read as the plain 8-bit file: v * 257 of 65535 is v of 255."""
    path, _ = models["shapes"]
    grey = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    files = {
        "plain.pgm": b"P5\n64 64\n255\n" + grey.tobytes(),
        "comments.pgm": b"P5 # a comment\n#another\r64\t64 # x\n255#last\n" + grey.tobytes(),
        "wide.pgm": b"P5\n64 64\n65535\n" + (grey.astype(">u2") * 257).tobytes(),
    }
    for name, contents in files.items():
        (tmp_path / name).write_bytes(contents)
    run(cam_ort, path, *(tmp_path / n for n in files), "--out", tmp_path / "out", "--save-input")
    want = np.broadcast_to(grey / np.float32(255), (3, 64, 64))
    for name in files:
        got = np.load(tmp_path / "out" / f"{Path(name).stem}.input.npy")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--batch", "0", "--batch expects an integer in 1..4096, got '0'"),
        ("--batch", "-1", "--batch expects an integer in 1..4096, got '-1'"),
        ("--batch", "abc", "--batch expects an integer in 1..4096, got 'abc'"),
        ("--batch", "4097", "--batch expects an integer in 1..4096, got '4097'"),
        ("--batch", "2x", "--batch expects an integer in 1..4096, got '2x'"),
        ("--batch", " 2", "--batch expects an integer in 1..4096, got ' 2'"),
        ("--batch", "+2", "--batch expects an integer in 1..4096, got '+2'"),
        ("--batch", "", "--batch expects an integer in 1..4096, got ''"),
        ("--batch", "9" * 30, f"--batch expects an integer in 1..4096, got '{'9' * 30}'"),
        ("--threads", "0", "--threads expects an integer in 1..1024, got '0'"),
        ("--device", "-1", "--device expects an integer in 0..1023, got '-1'"),
        ("--bench", "0", "--bench expects an integer in 1..1000000, got '0'"),
        ("--warmup", "x", "--warmup expects an integer in 0..1000000, got 'x'"),
        ("--size", "0x64", "--size expects HxW with sides in 1..16384, got '0x64'"),
        ("--size", "64x99999", "--size expects HxW with sides in 1..16384, got '64x99999'"),
        ("--size", "64", "--size expects HxW with sides in 1..16384, got '64'"),
        ("--classes", "1,,2", "--classes expects class indices 0,1,..., got '1,,2'"),
        ("--classes", "-1", "--classes expects class indices 0,1,..., got '-1'"),
    ],
)
def test_numeric_options_are_checked(cam_ort, models, tmp_path, option, value, message):
    good = _npy(tmp_path, "x.npy", np.zeros((3, 64, 64), np.float32))
    done = run(cam_ort, models["shapes"][0], good, option, value, "--out", tmp_path, check=False)
    assert done.returncode == 2
    assert done.stderr == f"cam-ort: error: {message}\n"


def test_classes_out_of_range(cam_ort, models, tmp_path):
    path, x = models["shapes_fixed"]  # 4 classes
    np.save(tmp_path / "x.npy", x.numpy())
    done = run(
        cam_ort, path, tmp_path / "x.npy", "--classes", "3,4", "--out", tmp_path, check=False
    )
    assert done.returncode == 2
    assert done.stderr == (
        "cam-ort: error: --classes: class 4 is out of range for a model with 4 classes (0..3)\n"
    )


def test_npy_format_versions(cam_ort, models, tmp_path):
    """numpy's .npy versions 1.0, 2.0 (4-byte header length) and 3.0 read alike."""
    path, x = models["shapes"]
    names = []
    for version in ((1, 0), (2, 0), (3, 0)):
        names.append(tmp_path / f"v{version[0]}.npy")
        with open(names[-1], "wb") as file:
            np.lib.format.write_array(file, x[0].numpy(), version=version)
    run(cam_ort, path, *names, "--out", tmp_path / "out", "--save-input")
    for name in names:
        got = np.load(tmp_path / "out" / f"{name.stem}.input.npy")
        np.testing.assert_array_equal(got, x[0].numpy())
