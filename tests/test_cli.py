"""The command line as one tool: the same option names everywhere, defaults in every help,
``--help`` and ``--version`` without torch."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image

import cam_engine
from cam_engine import cli
from cam_engine.commands import export
from cam_engine.io import probability_text
from cam_engine.pipeline import Explained, outputs
from cam_engine.pipeline.outputs import picture_name

ROOT = Path(__file__).resolve().parents[1]

#: every command's arguments besides the ones under test, so that parse_args succeeds
BASE = {
    "explain": ["explain", "imgs", "--model", "resnet18"],
    "export": ["export", "m.onnx", "--model", "resnet18"],
    "bench": ["bench"],
    "profile": ["profile"],
}


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_do_not_import_torch(argv):
    script = (
        "import sys\nfrom cam_engine import cli\ntry:\n    cli.main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "LOADED []" in done.stdout
    if argv == ["--version"]:
        assert done.stdout.startswith(f"cam-engine {cam_engine.__version__}\n")
    else:
        assert all(name in done.stdout for name in cli.COMMANDS)


@pytest.mark.parametrize("command", ["explain", "export", "bench", "profile"])
def test_every_command_takes_the_same_names_and_the_old_ones(command):
    parser = cli.build_parser(command)
    new = ["--target-layer", "layer3", "--input-size", "64,48"]
    old = ["--layer", "layer3", "--size", "64x48"]
    if command != "export":
        new += ["--batch-size", "3"]
        old += ["--batch", "3"]
    for argv in (new, old):
        args = parser.parse_args(BASE[command] + argv)
        assert (args.target_layer, args.input_size) == ("layer3", (64, 48))
        if command != "export":
            assert args.batch_size == 3


@pytest.mark.parametrize(
    ("text", "size"), [("64", (64, 64)), ("64,48", (64, 48)), ("64x48", (64, 48)), (" 7 ", (7, 7))]
)
def test_input_size_forms(text, size):
    args = cli.build_parser("explain").parse_args([*BASE["explain"], "--input-size", text])
    assert args.input_size == size


@pytest.mark.parametrize("text", ["0", "64,0", "a", "1,2,3", "64x", ""])
def test_a_bad_input_size_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser("profile").parse_args(["profile", "--input-size", text])
    assert exit_.value.code == 2
    assert "argument --input-size/--size: expected H,W or HxW or S" in capsys.readouterr().err


def test_export_keeps_its_two_number_input_size():
    argv = export.normalize_argv(["export", "--input-size", "64", "48", "m.onnx", "--model", "x"])
    args = cli.build_parser("export").parse_args(argv)
    assert (args.input_size, args.out) == ((64, 48), Path("m.onnx"))
    # a single number is left alone: the next word is the output file
    argv = ["export", "--input-size", "64", "7", "--model", "x"]
    assert export.normalize_argv(argv)[2] == "64,7"
    assert export.normalize_argv(["export", "--input-size", "64", "m.onnx"])[2] == "64"


def test_bench_and_profile_time_square_images_only(capsys):
    assert cli.main(["bench", "--input-size", "64,48", "--models", "resnet18"]) == 2
    assert "--input-size 64,48: expected a square" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "explain", "export", "bench", "profile"])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    expected = {
        "demo": ["images per contact sheet (default: 6)", "(default: out/demo)"],
        "explain": ["images per engine call (default: 16)", "(default: top1)", "(default: jet)"],
        "export": ["(default: cam)", "classes explained per image (default: 1)"],
        "bench": ["(default: 8)", "(default: gradcam,cam)", "--no-memory", "16 processes"],
        "profile": ["images per call (default: 8)", "(default: resnet50)", "(default: 3)"],
    }[command]
    for part in expected:
        assert part in text, part
    assert "(default: None)" not in text and "(default: False)" not in text


def test_every_option_has_help():
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"


# what explain writes: sheet titles, picture names ---------------------------------------------


@pytest.mark.parametrize(
    ("p", "text"),
    [(0.00123456, "0.00123"), (0.87, "0.870"), (1.0, "1.00"), (0.0456, "0.0456"), (0.0, "0.00")],
)
def test_probabilities_show_three_significant_digits(p, text):
    assert probability_text(p) == text


def test_sheet_titles_show_small_probabilities():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    result = Explained(
        "a.png", [3, 5], ["cat", "dog"], [0.870, 0.00123], (8, 8), None, image, image[None] * 2
    )
    titles = []
    with patch.object(outputs, "contact_sheet_rows", lambda tiles, t: titles.extend(t)):
        dict(outputs.pictures(result, {"sheet"}))
    assert titles == [["a.png", "cat p=0.870", "dog p=0.00123"]]


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("astronaut.png", "astronaut_png"),
        ("a/1.jpg", "a/1_jpg"),
        ("d.e/x.y.JPEG", "d.e/x.y_JPEG"),
        ("a_png.png", "a_png_png"),
    ],
)
def test_picture_names_carry_no_double_extension(key, name):
    assert picture_name(key) == name


def test_picture_names_are_distinct_and_safe():
    keys = ["a.png", "a.jpg", "a_png", "a_png.png", "a.", "a", "a.p-g", "bad\nname.png", "é.png"]
    names = [picture_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert names[:2] == ["a_png", "a_jpg"] and names[-1] == "é_png"
    # without a plain extension: a hash, as output_name gives hostile names
    assert names[2] == f"a_png~{hashlib.sha256(b'a_png').hexdigest()[:16]}"
    assert all("\n" not in n and len(n.encode()) <= 255 - len(".999.png") for n in names)
    assert picture_name("x" * 300 + ".png") != picture_name("x" * 300 + ".jpg")


def test_explain_names_pictures_by_stem(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
    for name in ("a.png", "a.jpg"):
        Image.fromarray(pixels).save(folder / name)
    out = tmp_path / "out"
    argv = ["explain", str(folder), "--model", f"{ROOT / 'tests' / 'test_cli.py'}:tiny_net"]
    argv += ["--input-size", "16", "--workers", "0", "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    sheets = sorted(p.name for p in (out / "sheets").iterdir())
    assert sheets == ["a_jpg.png", "a_png.png"]
    rows = list(csv.DictReader(open(out / "predictions.csv", newline="")))
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted(f"{picture_name(r['image'])}.{r['class_id']}.png" for r in rows)


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )


# what bench and profile print ------------------------------------------------------------------


def test_profile_prints_no_profiler_log_lines(tmp_path):
    argv = ["profile", "--model", "resnet18", "--input-size", "32", "--batch-size", "1"]
    argv += ["--repeats", "1", "--no-reference", "--threads", "1", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-m", "cam_engine.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    assert done.stderr == ""
    assert "resnet18 at 'layer4', batch 1, 32x32" in done.stdout


def test_bench_hides_the_cuda_home_warning():
    script = (
        "import logging, sys\nfrom cam_engine.commands.common import quiet_torch_logs\n"
        "quiet_torch_logs()\nimport torch.utils.cpp_extension\n"
        "logging.getLogger('torch.utils.cpp_extension').warning('kept')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stderr.strip().endswith("kept") and "No CUDA runtime" not in done.stderr


def test_bench_exports_its_plain_onnx_model_quietly(tmp_path, capfd):
    pytest.importorskip("onnxruntime")
    from cam_engine.bench import backends as bk

    model = tiny_net().eval()
    x = torch.rand(1, 3, 16, 16)
    case = bk.Case(model, "0", "cam", x, tmp_path, "tiny")
    prepared = bk.BACKENDS["ort-plain"].prepare(case)
    logits = prepared.call(x)
    torch.testing.assert_close(logits, model(x).detach(), atol=1e-5, rtol=1e-5)
    captured = capfd.readouterr()
    assert "[torch.onnx]" not in captured.out + captured.err


def test_the_package_imports_its_names_on_first_use():
    script = (
        "import sys\nimport cam_engine as ce\nassert 'torch' not in sys.modules\n"
        "from cam_engine import CAMEngine, TopK\nfrom cam_engine.engine import CAMEngine as E\n"
        "assert CAMEngine is E and ce.TopK is TopK and ce.wrap.__module__ == 'cam_engine.model'\n"
        "assert callable(ce.targets.BinaryScore) and callable(ce.layout.to_nchw)\n"
        "assert 'gradcam' in ce.methods.available() and set(ce.__all__) <= set(dir(ce))\n"
        "try:\n    ce.nope\nexcept AttributeError:\n    print('OK')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout == "OK\n"
