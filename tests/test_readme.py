"""README.md's Python blocks run as written.

The ```python blocks run in order in one namespace (a reader's session: a later block may use
what an earlier one made), in a temporary folder holding a generated JPEG for every ``*.jpg``
name they quote. Marker: a block right after a line ``<!-- test_readme: skip, REASON -->`` is not
run; REASON says what it needs that a test machine lacks (a Ray cluster, a GPU).

For speed and offline use, the text is changed by the substitutions below, and only these: each
must apply (so the README cannot drift away from them unnoticed).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "<!-- test_readme: skip"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SUBSTITUTIONS = [
    ('weights="DEFAULT"', "weights=None"),  # no downloads here: random weights
    ("resnet50(", "resnet18("),  # a smaller model of the same layout
    ("[224, 224]", "[64, 64]"),  # smaller images, and exports at their size
    ("input_size=(256, 256)", "input_size=(64, 64)"),
    ("dynamic_size=True)", "dynamic_size=True, input_size=(64, 64))"),
    ("weights_backbone=None)", "weights_backbone=None, min_size=64, max_size=64)"),  # not 320
]


def readme_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) of every ```python block of ``text``."""
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), before.startswith(SKIP)))
    return blocks


def test_block_extraction_and_the_skip_marker():
    text = "a\n```python\nx = 1\n```\n<!-- test_readme: skip, a GPU -->\n```python\ny\n```\n"
    assert readme_blocks(text) == [(2, "x = 1\n", False), (6, "y\n", True)]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    text = README.read_text()
    for old, new in SUBSTITUTIONS:
        assert old in text, f"the README no longer has {old!r}: update SUBSTITUTIONS"
        text = text.replace(old, new)
    blocks = readme_blocks(text)
    assert sum(not skipped for *_, skipped in blocks) >= 4
    rng = np.random.default_rng(0)
    for name in sorted(set(re.findall(r'"([\w-]+\.jpg)"', text))):
        pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for line, code, skipped in blocks:
        if skipped:
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), scope)  # noqa: S102
        except Exception as exc:
            pytest.fail(f"the README's block at line {line} fails: {exc!r}")
    # the first block's overlays, and the compat block's arrays
    assert [len(list(tmp_path.glob(f"{name}.*.png"))) for name in ("cat", "dog")] == [1, 1]
    assert scope["grayscale_cam"].shape == (2, 64, 64)
    assert scope["visualization"].shape == (64, 64, 3)
