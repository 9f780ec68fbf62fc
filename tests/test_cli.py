"""The command line as one tool: the same option names everywhere, defaults in every help,
``--help`` and ``--version`` without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import cam_engine
from cam_engine import cli
from cam_engine.commands import export

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
