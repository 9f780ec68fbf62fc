"""What a person looks at: ``index.html`` of ``cam-engine explain`` (in headless Chromium), the
``picture`` column of ``predictions.csv``, ``CAMResult.show()`` and its notebook display.

References are independent of the code under test: overlays blended here by hand from the jet
lookup table, probabilities by a direct softmax, the page read back by ``html.parser`` and by a
real browser.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cam_engine.pipeline import ExplainConfig, explain
from cam_engine.pipeline.outputs import picture_name

HERE = Path(__file__).resolve()
#: file names and class names that would be markup if a page pasted them in unescaped
HOSTILE_IMAGE = "<img src=x onerror=alert(1)>.png"
LABELS = ["<b>bold</b>", "a & b", '"quoted" </td></table>', "plain", "<script>x()</script>"]
IMAGES = {"sub/blue.png": (0, 0, 255), HOSTILE_IMAGE: (255, 255, 0), "red #1.jpg": (255, 0, 0)}


def tiny_net() -> nn.Module:
    """A small GAP classifier, the same every call (``--model file.py:tiny_net``)."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    head = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 5))
    return nn.Sequential(OrderedDict(features=features, **head))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One explain run over three 40x48 images with hostile names and class names (top 2)."""
    root = tmp_path_factory.mktemp("gallery")
    for name, colour in IMAGES.items():
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((40, 48, 3), np.uint8)
        pixels[8:30, 10:40] = colour  # a coloured block on black
        Image.fromarray(pixels).save(path, format="PNG")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    config = ExplainConfig(
        [root / "images"],
        f"{HERE}:tiny_net",
        out=root / "out",
        labels=root / "labels.txt",
        target_layer="features",
        targets="top2",
        input_size=32,
        device="cpu",
        workers=0,
    )
    assert explain(config).explained == len(IMAGES)
    return root / "out"


# predictions.csv ------------------------------------------------------------------------------


def test_predictions_name_each_rows_pictures(run):
    rows = _read_csv(run / "predictions.csv")
    assert list(rows[0]) == ["image", "class_id", "class_name", "score", "picture"]
    assert sorted({r["image"] for r in rows}) == sorted(IMAGES)
    for row in rows:
        assert row["picture"] == picture_name(row["image"])
        assert (run / "sheets" / f"{row['picture']}.png").is_file()
        assert (run / "overlays" / f"{row['picture']}.{row['class_id']}.png").is_file()
    hostile = "<img src=x onerror=alert(1)>_png"
    assert {r["picture"] for r in rows} == {"sub/blue_png", hostile, "red #1_jpg"}
