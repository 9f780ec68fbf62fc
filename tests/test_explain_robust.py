"""``cam-engine explain`` against bad inputs, crashes and reruns: one bad image never costs the
others, every output file is whole or absent, and a killed run resumes where it stopped.

References: images decoded by PIL, an uninterrupted run over the images of ``test_explain``
(``reference``), sizes written by hand into file headers.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_explain import (
    CORRUPT,
    IMAGES,
    INPUT,
    TRUNCATED,
    K,
    _explain_args,
    _read_csv,
    tiny_net,
)
from torch import nn

import cam_engine as ce
from cam_engine import cli
from cam_engine.io import ImageFolder, contact_sheet, image_size, save_png
from cam_engine.pipeline import ExplainConfig, output_name
from cam_engine.pipeline.outputs import picture_name

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PIXEL_LIMIT = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS


def _pause(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.3)
    return x


torch.fx.wrap("_pause")  # a call in the traced graph, so it runs at every forward


class _Pause(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pause(x)


def slow_net() -> nn.Module:
    """``tiny_net`` (same weights) taking 0.3 s per forward: a run long enough to kill."""
    net = tiny_net()
    net.features = nn.Sequential(_Pause(), *net.features)
    return net




@pytest.fixture(scope="module")
def reference(image_dir, labels_file, tmp_path_factory) -> Path:
    """The outputs of an uninterrupted run (batches of 4, 2 decoding workers)."""
    out = tmp_path_factory.mktemp("reference")
    args = _explain_args(image_dir, out, labels_file, "--batch-size", "4", "--workers", "2")
    assert cli.main(args) == 0
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    """A CSV of the run; names that are not UTF-8 are in it as their bytes."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
        return list(csv.DictReader(file))


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("cam-engine explain: error:")]


def _assert_same_outputs(out: Path, reference: Path) -> None:
    """The outputs equal the reference run's: rows, skipped files, heatmaps, picture files."""
    mine, theirs = _read_csv(out / "predictions.csv"), _read_csv(reference / "predictions.csv")
    assert [(r["image"], r["class_id"]) for r in mine] == [
        (r["image"], r["class_id"]) for r in theirs
    ]
    scores = [[float(r["score"]) for r in rows] for rows in (mine, theirs)]
    np.testing.assert_allclose(*scores, rtol=1e-5)
    assert _read_csv(out / "skipped.csv") == _read_csv(reference / "skipped.csv")
    maps, expected = np.load(out / "heatmaps.npz"), np.load(reference / "heatmaps.npz")
    assert sorted(maps.files) == sorted(expected.files)
    for key in expected.files:
        np.testing.assert_allclose(maps[key], expected[key], atol=1e-5, rtol=0)
    for folder in ("overlays", "sheets"):
        names = sorted(p.relative_to(reference) for p in (reference / folder).rglob("*.png"))
        assert sorted(p.relative_to(out) for p in (out / folder).rglob("*.png")) == names
    assert not (out / ".tmp").exists() and not (out / "parts").exists()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height (1-bit grey) and stops after a little image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(bytes(1 + (width + 7) // 8) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows))


# settings --------------------------------------------------------------------------------------


def test_config_takes_typed_or_command_line_values_and_checks_them():
    text = ExplainConfig("a", "m", targets="7,2", input_size="64x48", mean="0,0,0", save="npz")
    typed = ExplainConfig(
        ("a",), "m", targets=[7, 2], input_size=(64, 48), mean=(0, 0, 0), save={"npz"}
    )
    assert text == typed and text.targets == (7, 2) and text.save == frozenset({"npz"})
    assert ExplainConfig("a", "m", input_size=32).input_size == (32, 32)
    assert ExplainConfig("a", "m", targets="bottom2").targets == ce.BottomK(2)
    assert text.settings()["targets"] == "7,2" and text.settings()["weights_sha256"] is None
    for bad, message in [
        ({"alpha": 1.5}, "--alpha"),
        ({"targets": "top0"}, "at least 1"),
        ({"mean": "1,2"}, "--mean needs 3 values"),
        ({"std": (1, 0, 1)}, "std > 0"),
        ({"save": "png,gif"}, "gif"),
        ({"max_pixels": 0}, "--max-pixels"),
        ({"images": []}, "no images"),
    ]:
        with pytest.raises(ValueError, match=message):
            ExplainConfig(**{"images": "a", "model": "m", **bad})


# inputs ----------------------------------------------------------------------------------------


def test_image_size_reads_the_header_of_every_decodable_format(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cases = {
        "png": {"format": "PNG"},
        "jpg": {"format": "JPEG", "exif": b"Exif\x00\x00" + bytes(5000)},  # SOF after a big APP1
        "progressive.jpg": {"format": "JPEG", "progressive": True},
        "gif": {"format": "GIF"},
        "lossy.webp": {"format": "WEBP"},
        "lossless.webp": {"format": "WEBP", "lossless": True},
        "alpha.webp": {"format": "WEBP", "exif": b"Exif\x00\x00II*\x00"},  # VP8X
    }
    for name, options in cases.items():
        path = tmp_path / f"x.{name}"
        Image.fromarray(pixels).save(path, **options)
        assert image_size(path) == (37, 53), name
    _png_header_only(tmp_path / "bomb.png", 30000, 20000)
    assert image_size(tmp_path / "bomb.png") == (20000, 30000)
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    assert image_size(tmp_path / "text.png") is None
    (tmp_path / "cut.png").write_bytes((tmp_path / "x.png").read_bytes()[:20])
    assert image_size(tmp_path / "cut.png") is None


def test_images_over_the_pixel_limit_are_skipped_before_decoding(
    tmp_path, labels_file, monkeypatch
):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (30, 20), "red").save(root / "small.png")  # 600 pixels
    Image.new("RGB", (50, 40), "blue").save(root / "big.png")  # 2000 pixels
    _png_header_only(root / "bomb.png", 30000, 30000)  # 900 M pixels in 125 bytes
    decoded = []
    real = ce.io.decode_image
    monkeypatch.setattr(
        ce.io, "decode_image", lambda data, **kw: decoded.append(len(data)) or real(data, **kw)
    )

    out = tmp_path / "out"
    args = _explain_args(root, out, labels_file, "--workers", "0", "--max-pixels", "1000")
    assert cli.main(args) == 0
    assert decoded == [(root / "small.png").stat().st_size]  # the others: not even read
    assert [r["image"] for r in _read_csv(out / "predictions.csv")] == ["small.png"] * K
    reasons = {r["image"]: r["reason"] for r in _read_csv(out / "skipped.csv")}
    assert reasons == {
        "big.png": "50x40 = 2000 pixels, over the limit of 1000 (--max-pixels)",
        "bomb.png": "30000x30000 = 900000000 pixels, over the limit of 1000 (--max-pixels)",
    }
    # the default limit is Pillow's
    sample = ImageFolder([root / "bomb.png"], (INPUT, INPUT))[0]
    limit = f"over the limit of {PIXEL_LIMIT} (--max-pixels)"
    assert sample.error == f"30000x30000 = 900000000 pixels, {limit}"
    assert ImageFolder([root / "big.png"], (INPUT, INPUT))[0].error is None


def test_an_animated_gif_gives_its_first_frame(tmp_path, labels_file):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(root / "anim.png", format="GIF", save_all=True, append_images=frames[1:])
    Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(root / "still.png")
    first = np.array(Image.open(root / "anim.png").convert("RGB"))
    first = torch.from_numpy(first).permute(2, 0, 1)
    sample = ImageFolder([root / "anim.png"], (INPUT, INPUT))[0]
    assert torch.equal(sample.original, first)

    out = tmp_path / "out"
    args = _explain_args(root, out, labels_file, "--workers", "0", "--batch-size", "2")
    assert cli.main(args) == 0
    maps = torch.from_numpy(np.load(out / "heatmaps.npz")["anim.png"])
    assert maps.shape == (K, 30, 41)
    rows = _read_csv(out / "predictions.csv")
    classes = [r["class_id"] for r in rows if r["image"] == "anim.png"]
    expected = ce.overlay(first[None], maps[None])[0]
    for k, c in enumerate(classes):
        png = torch.from_numpy(np.array(Image.open(out / "overlays" / f"anim_png.{c}.png")))
        assert (png.permute(2, 0, 1).int() - expected[k].int()).abs().max() <= 1


ODD_NAMES = [
    "plain.png",
    "new\nline.png",
    os.fsdecode(b"caf\xe9.png"),  # Latin-1, not UTF-8
    "x" * 246 + ".png",  # 250 bytes: its overlay name would pass the 255-byte limit
]


def test_output_names_are_printable_utf8_short_and_distinct():
    keys = [*ODD_NAMES, os.fsdecode(b"dir\xff/a.png"), "x" * 247 + ".png", "tab\t.png"]
    names = [output_name(key) for key in keys]
    assert names[0] == "plain.png" and output_name("a/b c/d.JPG") == "a/b c/d.JPG"
    assert len(set(names)) == len(names)
    for name in names:
        name.encode("utf-8")  # strict: no surrogates
        assert all(len(part.encode()) <= 200 for part in name.split("/"))
        assert not any(unicodedata.category(ch) == "Cc" for ch in name)
    assert names[1].startswith("new_line.png~") and names[4].startswith("dir_~")
    assert names[4].endswith("/a.png") and names[6].startswith("tab_.png~")


def test_odd_file_names_are_explained_and_named_safely(tmp_path, labels_file):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(2)
    for name in ODD_NAMES:
        Image.fromarray(rng.integers(0, 256, (24, 35, 3), dtype=np.uint8)).save(root / name, "PNG")
    out = tmp_path / "out"
    assert cli.main(_explain_args(root, out, labels_file, "--workers", "0")) == 0

    rows = _rows(out / "predictions.csv")
    assert sorted({r["image"] for r in rows}) == sorted(ODD_NAMES)  # the names as they are
    assert _rows(out / "skipped.csv") == []
    maps = np.load(out / "heatmaps.npz")
    assert sorted(maps.files) == sorted(map(output_name, ODD_NAMES))
    for name in ODD_NAMES:
        safe = output_name(name)
        assert maps[safe].shape == (K, 24, 35)
        picture = picture_name(name)
        assert Image.open(out / "sheets" / f"{picture}.png").size[0] > 35 * (K + 1)
        for c in [r["class_id"] for r in rows if r["image"] == name]:
            assert Image.open(out / "overlays" / f"{picture}.{c}.png").size == (35, 24)


def test_contact_sheet_titles_may_hold_any_character():
    tiles = torch.zeros(1, 2, 3, 20, 30, dtype=torch.uint8)
    sheet = contact_sheet(tiles, [["new\nline\r.png", os.fsdecode(b"caf\xe9\x00.png")]])
    assert sheet.size[1] > 20


def test_a_batch_that_fails_in_the_engine_costs_only_the_image_that_fails_alone(
    image_dir, labels_file, reference, tmp_path, monkeypatch
):
    from cam_engine.pipeline import compute

    sample = ImageFolder([image_dir / "gray.png"], (INPUT, INPUT))[0]
    real = compute.explain_batch

    def fails_on_gray(engine, loaded, batch, targets):
        if any(torch.equal(x, sample.input) for x in batch.inputs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(engine, loaded, batch, targets)

    monkeypatch.setattr(compute, "explain_batch", fails_on_gray)
    out = tmp_path / "out"
    args = _explain_args(image_dir, out, labels_file, "--batch-size", "4", "--workers", "0")
    assert cli.main(args) == 0
    reasons = {r["image"]: r["reason"] for r in _read_csv(out / "skipped.csv")}
    assert reasons.keys() == {CORRUPT, TRUNCATED, "gray.png"}
    assert reasons["gray.png"] == "RuntimeError: CUDA out of memory (simulated)"
    maps, expected = np.load(out / "heatmaps.npz"), np.load(reference / "heatmaps.npz")
    assert sorted(maps.files) == sorted(set(IMAGES) - {"gray.png"})
    for key in maps.files:
        np.testing.assert_allclose(maps[key], expected[key], atol=1e-5, rtol=0)


def test_out_inside_an_input_folder_is_never_read_as_input(image_dir, labels_file, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(image_dir, root)
    args = _explain_args(root, root / "out", labels_file, "--workers", "0", "--save", "png")
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # now with the first run's overlays in the folder
    keys = {r["image"] for r in _read_csv(root / "out" / "predictions.csv")}
    assert keys == set(IMAGES)


# errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["cuda", "out is a file", "unwritable out"])
def test_setup_errors_are_one_line_and_write_nothing(
    case, image_dir, labels_file, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    extra = []
    if case == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        extra = ["--device", "cuda"]
    elif case == "out is a file":
        out.write_text("mine")
    else:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("needs a read-only folder even for root: /sys")
        out = Path("/sys/kernel/cam-engine-out")
    args = _explain_args(image_dir, out, labels_file, *extra)
    if extra:
        args[args.index("--device") : args.index("--device") + 2] = extra
    assert cli.main(args) == 2
    (error,) = _errors(capsys.readouterr().err)
    assert {"cuda": "no cuda device", "out is a file": "not a folder", "unwritable out": "cannot"}[
        case
    ] in error
    if case == "out is a file":
        assert out.read_text() == "mine"
    else:
        assert not out.exists()


def test_a_second_run_is_refused_while_the_first_holds_the_lock(
    image_dir, labels_file, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    args = _explain_args(image_dir, out, labels_file, "--workers", "0", "--save", "npz")
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run is writing
        assert cli.main(args) == 2
        (error,) = _errors(capsys.readouterr().err)
        assert str(out / ".lock") in error
        assert os.listdir(out) == [".lock"]
    # the lock dies with its holder: the file left behind does not block
    assert cli.main(args) == 0


def test_a_rerun_resumes_and_other_settings_need_overwrite(
    image_dir, labels_file, tmp_path, capsys
):
    out = tmp_path / "out"
    args = _explain_args(image_dir, out, labels_file, "--workers", "0")
    assert cli.main(args) == 0
    pictures = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "8 of 8 images already done" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == pictures  # not redone

    other = [*args]
    other[other.index("--targets") + 1] = "top1"
    assert cli.main(other) == 2
    (error,) = _errors(capsys.readouterr().err)
    assert "targets: 'top2' there, 'top1' now" in error and "--overwrite" in error
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == pictures

    assert cli.main([*other, "--overwrite"]) == 0
    assert len(list((out / "overlays").rglob("*.png"))) == len(IMAGES)  # one class each now
    assert len(_read_csv(out / "predictions.csv")) == len(IMAGES)


def test_another_weights_file_at_the_same_path_is_other_settings(
    image_dir, labels_file, tmp_path, capsys
):
    weights = tmp_path / "w.pt"
    torch.save(tiny_net().state_dict(), weights)
    out = tmp_path / "out"
    args = _explain_args(image_dir / "sub", out, labels_file, "--workers", "0", "--save", "npz")
    args += ["--weights", str(weights)]
    assert cli.main(args) == 0
    changed = tiny_net()
    with torch.no_grad():
        changed.fc.bias += 1
    torch.save(changed.state_dict(), weights)
    assert cli.main(args) == 2
    (error,) = _errors(capsys.readouterr().err)
    assert "weights_sha256" in error


def test_a_full_disk_stops_the_run_with_one_line_and_leaves_no_partial_file(
    image_dir, labels_file, reference, tmp_path, capsys, monkeypatch
):
    from cam_engine.pipeline import folder

    written = []

    def fills_the_disk(path, picture):
        written.append(path)
        if len(written) > 5:
            Path(path).write_bytes(b"\x89PNG\r\n")  # what fitted
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save_png(path, picture)

    monkeypatch.setattr(folder, "save_png", fills_the_disk)
    out = tmp_path / "out"
    args = _explain_args(image_dir, out, labels_file, "--batch-size", "4", "--workers", "0")
    assert cli.main(args) == 2
    (error,) = _errors(capsys.readouterr().err)
    assert "no space left" in error.lower() and "rerun" in error
    for png in out.rglob("*.png"):
        if ".tmp" not in png.parts:
            Image.open(png).load()  # whole
    monkeypatch.undo()
    assert cli.main(args) == 0  # space freed: the rerun completes
    _assert_same_outputs(out, reference)


def test_a_killed_run_leaves_whole_files_and_resumes(
    image_dir, labels_file, reference, tmp_path, capsys
):
    out = tmp_path / "out"
    args = _explain_args(image_dir, out, labels_file, "--batch-size", "1", "--workers", "0")
    args[args.index("--model") + 1] = f"{HERE}:slow_net"
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(  # this tree's cam_engine (-m), slow_net importing test_explain
            [sys.executable, "-m", "cam_engine.cli", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            if any((out / "parts").glob("*")):
                run.send_signal(signal.SIGKILL)  # after its first batch, mid-run
                break
            time.sleep(0.01)
        run.wait()
    assert run.returncode == -signal.SIGKILL, (tmp_path / "run.log").read_text()
    assert not (out / "predictions.csv").exists() and not (out / "heatmaps.npz").exists()
    for path in out.rglob("*"):
        if path.is_file() and ".tmp" not in path.parts and path.suffix == ".png":
            Image.open(path).load()
    for part in (out / "parts").iterdir():
        assert np.load(part)["record"].size > 0

    assert cli.main(args) == 0
    done = re.search(r"^(\d+) of 8 images already done", capsys.readouterr().err, re.M)
    assert 1 <= int(done[1]) < 8
    _assert_same_outputs(out, reference)
