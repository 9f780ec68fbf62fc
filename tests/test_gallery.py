"""What a person looks at: ``index.html`` of ``cam-engine explain`` (in headless Chromium), the
``picture`` column of ``predictions.csv``, ``CAMResult.show()`` and its notebook display.

References are independent of the code under test: overlays blended here by hand from the jet
lookup table, probabilities by a direct softmax, the page read back by ``html.parser`` and by a
real browser.
"""

from __future__ import annotations

import base64
import csv
import re
import shutil
import subprocess
from collections import Counter, OrderedDict
from dataclasses import replace
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from urllib.parse import unquote, urlencode

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cam_engine import CAMResult
from cam_engine.display import titles
from cam_engine.io import contact_sheet
from cam_engine.pipeline import ExplainConfig, explain
from cam_engine.pipeline.gallery import gallery_html
from cam_engine.pipeline.outputs import picture_name
from cam_engine.postprocess import colormap_lut

HERE = Path(__file__).resolve()
#: file names and class names that would be markup if a page pasted them in unescaped
HOSTILE_IMAGE = "<img src=x onerror=alert(1)>.png"
LABELS = ["<b>bold</b>", "a & b", '"quoted" </td></table>', "plain", "<script>x()</script>"]
IMAGES = {"sub/blue.png": (0, 0, 255), HOSTILE_IMAGE: (255, 255, 0), "red #1.jpg": (255, 0, 0)}
LATE = "red #1.jpg"  # added after the first run, explained by its rerun
#: the tags of the page itself: a name that became markup would add one
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "p", "label", "select", "option",
    "span", "a", "details", "summary", "table", "thead", "tbody", "tr", "th", "td", "img",
    "script",
}  # fmt: skip


def tiny_net() -> nn.Module:
    """A small GAP classifier, the same every call (``--model file.py:tiny_net``)."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    head = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 5))
    return nn.Sequential(OrderedDict(features=features, **head))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _image(root: Path, name: str) -> None:
    path = root / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((40, 48, 3), np.uint8)
    pixels[8:30, 10:40] = IMAGES[name]  # a coloured block on black
    Image.fromarray(pixels).save(path, format="PNG")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ExplainConfig:
    """A run over 40x48 images with hostile file and class names (top 2) into ``out``; its
    first run, without ``LATE``, left its gallery in ``first.html`` next to ``out``."""
    root = tmp_path_factory.mktemp("gallery")
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
    for name in IMAGES.keys() - {LATE}:
        _image(root, name)
    assert explain(config).explained == len(IMAGES) - 1
    shutil.copy(root / "out" / "index.html", root / "first.html")
    _image(root, LATE)
    assert explain(config).explained == len(IMAGES)
    return config


@pytest.fixture(scope="module")
def run(config) -> Path:
    return config.out


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


# index.html -----------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)"
)


class _Page(HTMLParser):
    """Every start tag of a page (name, attributes), and the cell texts of each table row."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[tuple[dict[str, str | None], list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr" and "data-class" in dict(attrs):
            self.rows.append((dict(attrs), []))
        elif tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", *args, url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def _coloured(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) the pixels of an (H, W, 3) picture with colour: the page's own are grey."""
    flat = pixels.reshape(-1, 3).astype(np.int64)
    return flat[flat.max(1) - flat.min(1) > 40]


def test_gallery_has_every_map_and_escapes_every_name(run):
    rows = _read_csv(run / "predictions.csv")
    page = _Page((run / "index.html").read_text(encoding="utf-8"))
    # no markup from a name: the page's own tags only, no event handler anywhere
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    assert [tag for tag, _ in page.tags].count("script") == 1
    assert not [attrs for _, attrs in page.tags if any(a.startswith("on") for a in attrs)]
    assert len(page.rows) == len(rows)
    for (attrs, cells), row in zip(page.rows, rows, strict=True):
        assert attrs["data-class"] == row["class_name"]
        assert cells[2:] == [
            row["image"],
            row["class_id"],
            row["class_name"],
            f"{float(row['score']):#.3g}",
        ]
    links = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    expected = [
        name
        for row in rows
        for name in (
            f"sheets/{row['picture']}.png",
            f"overlays/{row['picture']}.{row['class_id']}.png",
        )
    ]
    assert [unquote(link) for link in links] == expected
    assert all((run / unquote(link)).is_file() for link in links)
    options = [attrs["value"] for tag, attrs in page.tags if tag == "option"]
    assert options == ["", *sorted({r["class_name"] for r in rows})]


def test_gallery_page_is_bounded_and_lists_the_skipped():
    rows = [
        {
            "image": f"x{i}.png",
            "class_id": "1",
            "class_name": "a",
            "score": "0.5",
            "picture": f"x{i}_png",
        }
        for i in range(5)
    ]
    skipped = [{"image": "bad\udcff<i>.jpg", "reason": "<script>"}]  # a name that is not UTF-8
    page = gallery_html(rows, skipped, {"png", "npz"}, limit=3)
    parsed = _Page(page)
    assert [cells[1:] for _, cells in parsed.rows] == [
        [f"x{i}.png", "1", "a", "0.500"] for i in range(3)
    ]
    assert "The first 3 maps are below" in page and "5 maps" in page
    assert [a["src"] for tag, a in parsed.tags if tag == "img"] == [
        f"overlays/x{i}_png.1.png" for i in range(3)
    ]
    assert "bad\ufffd&lt;i&gt;.jpg" in page and "&lt;script&gt;" in page
    assert {tag for tag, _ in parsed.tags} <= PAGE_TAGS
    page.encode("utf-8")  # strict: the odd byte became U+FFFD


@needs_chromium
def test_chromium_shows_the_pictures(run, tmp_path):
    shot = tmp_path / "shot.png"
    _chromium(
        (run / "index.html").as_uri(), tmp_path, "--window-size=1400,1300", f"--screenshot={shot}"
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    seen = _coloured(pixels)
    # a blank page, or broken-image icons, would have almost no colour
    assert len(seen) > 0.1 * pixels.shape[0] * pixels.shape[1]
    # and the colours are the pictures': their mean, each picture weighted by its shown area
    # (every picture is shown 160 px high)
    total, count = np.zeros(3), 0.0
    for row in _read_csv(run / "predictions.csv"):
        for name in (
            f"sheets/{row['picture']}.png",
            f"overlays/{row['picture']}.{row['class_id']}.png",
        ):
            picture = np.asarray(Image.open(run / name).convert("RGB"))
            area = (160 / picture.shape[0]) ** 2
            coloured = _coloured(picture)
            total += area * coloured.sum(0)
            count += area * len(coloured)
    np.testing.assert_allclose(seen.mean(0), total / count, atol=6)  # measured: within 1


@needs_chromium
def test_chromium_filters_and_sorts_by_the_url(run, tmp_path):
    rows = _read_csv(run / "predictions.csv")
    chosen = Counter(r["class_name"] for r in rows).most_common(1)[0][0]
    url = (run / "index.html").as_uri() + "#" + urlencode({"class": chosen, "sort": "-score"})
    dom = _chromium(url, tmp_path, "--dump-dom").stdout
    page = _Page(dom)
    assert len(page.rows) == len(rows)  # the other classes' rows hidden, not gone
    shown = [cells[2:] for attrs, cells in page.rows if "hidden" not in attrs]
    mine = sorted((r for r in rows if r["class_name"] == chosen), key=lambda r: -float(r["score"]))
    assert len(mine) > 1 and shown == [
        [r["image"], r["class_id"], r["class_name"], f"{float(r['score']):#.3g}"] for r in mine
    ]
    assert f"{len(mine)} of {len(rows)} maps shown" in dom  # written by the page's script
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    assert not [attrs for _, attrs in page.tags if any(a.startswith("on") for a in attrs)]


def test_gallery_follows_reruns_and_save(config, tmp_path):
    first = _Page((config.out.parent / "first.html").read_text(encoding="utf-8"))
    assert {cells[2] for _, cells in first.rows} == IMAGES.keys() - {LATE}
    now = _Page((config.out / "index.html").read_text(encoding="utf-8"))
    assert {cells[2] for _, cells in now.rows} == IMAGES.keys()
    # without html in --save the folder resumes (the gallery binds nothing) and drops the page
    copy = replace(config, out=tmp_path / "out", save="png,sheet,npz")
    shutil.copytree(config.out, copy.out)
    assert explain(copy).attempted == 0
    assert not (copy.out / "index.html").exists()
    assert (copy.out / "predictions.csv").read_bytes() == (
        config.out / "predictions.csv"
    ).read_bytes()


# CAMResult.show() and its notebook display ----------------------------------------------------


def _result(batch: int, maps: int, size: tuple[int, int], seed: int = 0) -> CAMResult:
    """A result of random maps in [0, 1], random logits over the classes of ``LABELS`` and the
    best ``maps`` of them (round again past the 5 classes)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, len(LABELS), generator=generator) * 3
    classes = logits.argsort(1, descending=True)[:, torch.arange(maps) % len(LABELS)]
    heatmaps = torch.rand(batch, maps, *size, generator=generator)
    return CAMResult(heatmaps, heatmaps, logits, classes)


def _jet_overlay(image: torch.Tensor, heatmap: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float64: round(0.5 * jet colour + 0.5 * pixel), by hand."""
    colour = colormap_lut("jet")[(heatmap.double() * 255).round().long()].double()
    return (0.5 * colour + 0.5 * image.permute(1, 2, 0).double()).round().numpy()


def test_titles_name_the_class_and_its_probability():
    probabilities = torch.tensor([[0.87, 0.00123456, 0.12876544], [0.5, 0.25, 0.25]])
    classes = torch.tensor([[0, 1], [2, -1]])
    got = titles(classes, probabilities.log(), ["cat", "dog"])
    assert got == [["cat p=0.870", "dog p=0.00123"], ["class 2 p=0.250", "score"]]
    assert titles(classes, torch.zeros(2, 3, 4, 4)) == [
        ["class 0", "class 1"],
        ["class 2", "score"],
    ]


def test_show_draws_each_image_with_its_overlays():
    matplotlib.use("Agg")
    result = _result(2, 2, (24, 20))
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 24, 20), dtype=torch.uint8, generator=generator)
    fig = result.show(images, labels=LABELS)
    assert len(fig.axes) == 2 * 3 and fig.get_suptitle() == ""
    probabilities = result.logits.double().softmax(1)
    for b in range(2):
        row = fig.axes[3 * b : 3 * b + 3]
        assert row[0].get_title() == "image"
        np.testing.assert_array_equal(row[0].images[0].get_array(), images[b].permute(1, 2, 0))
        for k in range(2):
            c = int(result.classes[b, k])
            assert row[1 + k].get_title() == f"{LABELS[c]} p={float(probabilities[b, c]):#.3g}"
            drawn = row[1 + k].images[0].get_array().astype(np.float64)
            assert np.abs(drawn - _jet_overlay(images[b], result.heatmaps[b, k])).max() <= 1
    png = BytesIO()
    fig.savefig(png, format="png")  # renders with no display
    assert Image.open(png).size[0] > 100


def test_show_bounds_big_batches_and_refuses_mismatched_images():
    result = _result(20, 3, (8, 8))
    fig = result.show(max_images=4, max_maps=2)  # the heatmaps alone, coloured
    assert len(fig.axes) == 4 * 2 and fig.get_suptitle() == "first 4 of 20 images, 2 of 3 maps each"
    colour = colormap_lut("jet")[(result.heatmaps[3, 1].double() * 255).round().long()]
    np.testing.assert_array_equal(fig.axes[7].images[0].get_array(), colour.numpy())
    with pytest.raises(ValueError, match="one image per row"):
        result.show(torch.zeros(3, 3, 8, 8, dtype=torch.uint8))


def _inline_png(page: str) -> Image.Image:
    (data,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return Image.open(BytesIO(base64.b64decode(data))).convert("RGB")


def test_notebook_display_is_the_heatmaps_sheet():
    result = _result(2, 2, (30, 26))
    page = result._repr_html_()
    assert "CAMResult: 2 images x 2 maps, heatmaps (2, 2, 30, 26) float32 on cpu" in page
    colours = colormap_lut("jet")[(result.heatmaps.double() * 255).round().long()]
    expected = contact_sheet(colours.movedim(-1, -3), titles(result.classes, result.logits))
    np.testing.assert_array_equal(np.asarray(_inline_png(page)), np.asarray(expected))


def test_notebook_display_stays_small_for_big_batches():
    result = _result(40, 10, (7, 7))
    # smooth maps, as a network's are: 7x7 upsampled
    result.heatmaps = F.interpolate(result.heatmaps, (300, 200), mode="bilinear")
    page = result._repr_html_()
    assert "the first 8 images and 4 maps each shown" in page
    width, height = _inline_png(page).size
    assert width <= 4 * (96 + 4) + 4 and height <= 8 * (96 + 40)  # 8 x 4 tiles of 96 px
    assert len(page) < 300_000
