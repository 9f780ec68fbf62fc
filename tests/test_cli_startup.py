"""Every command's ``--help`` without torch, and the help's lists equal to the library's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

from cam_engine import arguments, cli, methods
from cam_engine.bench import backends, models
from cam_engine.postprocess import available_colormaps

ROOT = Path(__file__).resolve().parents[1]


def test_every_commands_help_loads_no_torch():
    """One fresh interpreter parses ``COMMAND --help`` of every command: none may load torch
    (nor NumPy or PIL), and each prints its options with the lists it shows."""
    script = (
        "import contextlib, io, sys\nfrom cam_engine import cli\n"
        "for command in cli.COMMANDS:\n"
        "    text = io.StringIO()\n"
        "    with contextlib.redirect_stdout(text):\n"
        "        try:\n            cli.main([command, '--help'])\n"
        "        except SystemExit:\n            pass\n"
        "    print(command, len(text.getvalue()), 'gradcam++' in text.getvalue())\n"
        "print('LOADED', sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[-1] == "LOADED []"
    shown = {line.split()[0]: line.split()[1:] for line in lines[:-1]}
    assert set(shown) == set(cli.COMMANDS)
    assert all(int(size) > 500 for size, _ in shown.values())  # a whole help, not an error
    assert shown["explain"][1] == shown["profile"][1] == "True"  # the methods are listed


@pytest.mark.parametrize(
    ("copy", "library"),
    [
        (arguments.METHODS, methods.available()),
        (arguments.COLORMAPS, available_colormaps()),
        (arguments.BENCH_BACKENDS, backends.available()),
        (arguments.AUTOCAST, list(models.AUTOCAST)),
        (arguments.COMPILE_MODES, models.COMPILE_MODES),
        (arguments.DETECTORS, torchvision.models.list_models(module=torchvision.models.detection)),
    ],
    ids=["methods", "colormaps", "backends", "autocast", "compile-modes", "detectors"],
)
def test_the_helps_lists_are_the_librarys(copy, library):
    assert list(copy) == list(library), "update cam_engine/arguments.py to the library's names"
