"""What makes the explain job fast, checked for what it must keep: PNG files that decoders read
back exactly, pictures drawn without torch on the writer threads, and batches committed off the
engine's thread. No timings are asserted."""

from __future__ import annotations

import io
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.io import decode_png

from cam_engine import io as cam_io
from cam_engine import npz
from cam_engine.io import png_bytes, save_png
from cam_engine.pipeline import ExplainConfig, explain
from cam_engine.pipeline.compute import SHEET_TILE, Explained, sheet_tiles
from cam_engine.pipeline.outputs import pictures
from cam_engine.pipeline.parts import Parts
from cam_engine.postprocess import shrink


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 5), (37, 53)])
def test_png_bytes_decode_to_the_same_pixels(shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    data = png_bytes(pixels)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # checks every chunk's CRC
        assert image.mode == "RGB" and image.size == shape[::-1]
        assert np.array_equal(np.asarray(image), pixels)
    decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert torch.equal(decoded, torch.from_numpy(pixels).permute(2, 0, 1))


def test_png_bytes_are_small_on_smooth_pictures():
    # a horizontal ramp: the Sub filter makes every row a run of 1s, which RLE deflates
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (64, 256, 3)).copy()
    raw = ramp.nbytes
    assert len(png_bytes(ramp)) < raw / 50
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        png_bytes(ramp[..., 0])


def _sheet_drawn_by_pil(tiles: np.ndarray, titles, pad: int = 4) -> np.ndarray:
    """Reference: the sheet drawn on one PIL image, title by title and tile by tile."""
    from PIL import ImageDraw

    rows, cols, height, width, _ = tiles.shape
    font = cam_io._font(width)
    line = font.getbbox("Ag|")[3] + pad
    sheet = Image.new("RGB", (cols * (width + pad) + pad, rows * (line + height + pad) + pad),
                      "white")  # fmt: skip
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        for c in range(cols):
            x, y = pad + c * (width + pad), pad + r * (line + height + pad)
            draw.text((x, y), cam_io._fit(draw, titles[r][c], font, width), "black", font)
            sheet.paste(Image.fromarray(tiles[r, c]), (x, y + line))
    return np.asarray(sheet)


def test_contact_sheet_rows_are_the_sheet_pil_draws():
    tiles = np.random.default_rng(2).integers(0, 256, (2, 3, 40, 64, 3), dtype=np.uint8)
    titles = [["a_rather_long_file_name.jpg", "golden retriever p=0.870", "x\ny"], ["", "Ag|", "z"]]
    rows = cam_io.contact_sheet_rows(tiles, titles)
    np.testing.assert_array_equal(rows, _sheet_drawn_by_pil(tiles, titles))
    planar = torch.from_numpy(tiles).permute(0, 1, 4, 2, 3)
    assert np.array_equal(np.asarray(cam_io.contact_sheet(planar, titles)), rows)


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "zlib"])
def test_save_png_writes_numpy_rows_with_valid_checksums(tmp_path, isal, monkeypatch):
    """RGB rows as a NumPy array (the overlays' form on the writer threads) are written as they
    are; libpng checks every chunk's CRC (ISA-L's or zlib's) when it decodes the file."""
    if not isal:  # zlib for the deflate (io) and for the chunks' CRCs (npz)
        monkeypatch.setattr(cam_io, "isal_zlib", None)
        monkeypatch.setattr(npz, "isal_zlib", None)
    pixels = np.random.default_rng(1).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    save_png(tmp_path / "rows.png", pixels)
    data = (tmp_path / "rows.png").read_bytes()
    assert zlib.crc32(data[12:29]) == int.from_bytes(data[29:33], "big")  # IHDR, by zlib
    decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert torch.equal(decoded, torch.from_numpy(pixels).permute(2, 0, 1))


def test_save_png_writes_other_pil_modes_through_pil(tmp_path):
    grey = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), "L")
    save_png(tmp_path / "g.png", grey)
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), np.asarray(grey))


class _Ops(TorchDispatchMode):
    """Records every torch operation run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _result(height: int = 600, width: int = 40, channels_last: bool = False) -> Explained:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    overlays = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=generator)
    if channels_last:  # as decoders and overlay() give them: views of (..., H, W, 3) pixels
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        overlays = overlays.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return Explained("a/b.jpg", [3, 1], ["x", "y"], [0.5, 0.25], (height, width), None, image,
                     overlays)  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels-last"])
def test_pictures_are_drawn_without_torch(channels_last):
    """The writer threads iterate ``pictures``: no torch operation may run there (each would
    start torch threads next to the engine's); the tensor work is done when it is called."""
    result = _result(channels_last=channels_last)
    drawn = pictures(result, {"png", "sheet"})
    with _Ops() as seen:
        found = list(drawn)
    assert seen.ops == []
    names = [name for name, _ in found]
    assert names == ["overlays/a/b_jpg.3.png", "overlays/a/b_jpg.1.png", "sheets/a/b_jpg.png"]
    # the overlays as they are, the sheet's tiles scaled to 512 px high (600 -> 512, 40 -> 34)
    for (_, picture), overlay in zip(found, result.overlays, strict=False):
        assert np.array_equal(np.asarray(picture), overlay.permute(1, 2, 0).numpy())
    sheet = found[2][1]
    assert sheet.shape[0] > 512 and sheet.shape[1] == 3 * (34 + 4) + 4


def test_rgb_rows_view_channels_last_images_and_copy_planar_ones():
    planar = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = np.stack([[[planar[n, :, y, x].tolist() for x in range(7)] for y in range(5)]
                         for n in range(2)]).astype(np.uint8)  # fmt: skip
    copied = cam_io.rgb_rows(planar)
    assert np.array_equal(copied, expected) and copied.flags.c_contiguous
    channels_last = planar.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    viewed = cam_io.rgb_rows(channels_last)
    assert np.array_equal(viewed, expected)
    assert np.shares_memory(viewed, channels_last.numpy())
    for bad in (planar.float(), planar[0], planar[:, :2]):
        with pytest.raises(ValueError, match=r"uint8 RGB images \(N, 3, H, W\)"):
            cam_io.rgb_rows(bad)


def test_sheet_tiles_are_made_with_the_overlays_and_drawn_as_given():
    """Tiles are the image and its overlays shrunk in one batch (channels-last: the sheet
    takes views), and the sheet shows the tiles of the result, not tiles of its own."""
    result = _result(height=640, width=480, channels_last=True)
    tiles = sheet_tiles(result.image[None], result.overlays[None])
    assert tiles.shape == (1, 3, 3, SHEET_TILE, 384)
    assert tiles.permute(0, 1, 3, 4, 2).is_contiguous()
    expected = torch.cat([shrink(result.image[None], 512), shrink(result.overlays, 512)])
    assert torch.equal(tiles[0], expected)
    with pytest.raises(ValueError, match=r"not \(B, K, 3, H, W\)"):
        sheet_tiles(result.image[None], result.overlays)
    result.tiles = torch.full_like(tiles[0], 7)  # as the job gives them, made on its thread
    sheet = dict(pictures(result, {"sheet"}))["sheets/a/b_jpg.png"]
    assert (sheet == 7).all(-1).sum() >= 3 * SHEET_TILE * 384  # (and a few pixels of titles)


def test_heatmaps_are_merged_as_batches_commit(tmp_path):
    """Each committed batch's heatmaps are copied into a temporary merge at once; the end adds
    the parts of an interrupted run and the heatmaps.npz of an earlier one, and drops nothing."""
    rng = np.random.default_rng(0)
    maps = {name: rng.random((1, 4, 5), dtype=np.float32) for name in "abcd"}

    def result(name: str) -> Explained:
        return Explained(f"{name}.jpg", [1], ["x"], [0.5], (4, 5), maps[name])

    earlier = Parts(tmp_path, npz=True)
    earlier.write_batch([result("a")], [])
    assert earlier.consolidate(["a.jpg"]) == (1, [])
    interrupted = Parts(tmp_path, npz=True)  # killed before its end: its part is the record
    interrupted.write_batch([result("b")], [])
    interrupted.close()
    assert not list((tmp_path / ".tmp").glob("heatmaps-*.npz"))

    run = Parts(tmp_path, npz=True)
    run.write_batch([result("c"), result("d")], [("e.jpg", "unreadable")])
    (merge,) = (tmp_path / ".tmp").glob("heatmaps-*.npz")  # written as the batch committed
    assert merge.stat().st_size > sum(m.nbytes for m in (maps["c"], maps["d"]))
    keys = [f"{name}.jpg" for name in "abcde"]
    assert run.consolidate(keys) == (4, [("e.jpg", "unreadable")])
    with np.load(tmp_path / "heatmaps.npz") as merged:
        assert sorted(merged.files) == keys[:4]
        for name, expected in maps.items():
            np.testing.assert_array_equal(merged[f"{name}.jpg"], expected)
    assert not merge.exists() and not (tmp_path / "parts").exists()


def test_batches_are_committed_off_the_engines_thread(tmp_path, monkeypatch):
    """A commit fsyncs its part file: the engine's thread must not wait for the disk. Commits
    still happen in batch order, each after its pictures."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    write_pictures, write_batch = Parts.write_pictures, Parts.write_batch

    def pictures_spy(self, found):
        found = list(found)
        with lock:
            events.extend(("picture", name.split("/")[1].split(".")[0]) for name, _ in found)
        write_pictures(self, found)

    def batch_spy(self, results, failures):
        with lock:
            events.append((threading.current_thread().name, ",".join(r.key for r in results)))
        write_batch(self, results, failures)

    monkeypatch.setattr(Parts, "write_pictures", pictures_spy)
    monkeypatch.setattr(Parts, "write_batch", batch_spy)
    config = ExplainConfig(
        [folder], "tests/test_explain.py:tiny_net", out=tmp_path / "out", batch_size=2,
        workers=0, input_size=16, target_layer="features", save="png",
    )  # fmt: skip
    assert explain(config).explained == 3
    commits = [(i, e) for i, e in enumerate(events) if e[0] != "picture"]
    assert [keys for _, (_, keys) in commits] == ["0.png,1.png", "2.png"]  # in batch order
    assert all(thread.startswith("cam-engine-commit") for _, (thread, _) in commits)
    for position, (_, keys) in commits:  # each after its pictures
        stems = {key.replace(".", "_") for key in keys.split(",")}
        drawn = {stem for kind, stem in events[:position] if kind == "picture"}
        assert stems <= drawn


def _images(folder, count: int = 3) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _tiny_config(tmp_path, **settings) -> ExplainConfig:
    settings = {"workers": 0, **settings}
    return ExplainConfig(
        [tmp_path / "images"], "tests/test_explain.py:tiny_net", out=tmp_path / "out",
        batch_size=2, input_size=16, target_layer="features", **settings,
    )  # fmt: skip


def _spy_batches(monkeypatch, fail_on=None) -> list[Tensor]:
    """Record every batch the engine explains (its uint8 inputs); ``fail_on(inputs)`` True makes
    the engine fail on that batch."""
    from cam_engine.pipeline import compute

    seen, real = [], compute.explain_batch

    def spy(engine, loaded, batch, targets):
        seen.append(batch.inputs)
        if fail_on is not None and fail_on(batch.inputs):
            raise RuntimeError("out of memory (simulated)")
        return real(engine, loaded, batch, targets)

    monkeypatch.setattr(compute, "explain_batch", spy)
    return seen


def test_a_run_whose_batches_succeed_explains_no_blank_image(tmp_path, monkeypatch):
    """The blank image that checks the setup is explained only when a batch fails: a run
    explains its images and nothing else."""
    _images(tmp_path / "images")
    seen = _spy_batches(monkeypatch)
    assert explain(_tiny_config(tmp_path, save="npz")).explained == 3
    assert [len(inputs) for inputs in seen] == [2, 1]
    assert all(inputs.any() for inputs in seen)


def test_a_failed_batch_checks_the_setup_once_then_goes_image_by_image(tmp_path, monkeypatch):
    _images(tmp_path / "images")
    seen = _spy_batches(monkeypatch, fail_on=lambda inputs: len(inputs) == 2)
    summary = explain(_tiny_config(tmp_path, save="npz"))
    assert summary.explained == 3 and summary.skipped == []
    blanks = [inputs for inputs in seen if not inputs.any()]
    assert [len(inputs) for inputs in seen] == [2, 1, 1, 1, 1]  # batch, blank, 0, 1; then 2
    assert len(blanks) == 1 and blanks[0] is seen[1]


def test_sheets_and_overlays_are_deflated(tmp_path):
    """Sheets and overlays are deflated (ISA-L makes it cheap) and decode to the pictures drawn."""
    ramp = torch.arange(40, dtype=torch.uint8).expand(3, 30, 40).contiguous()  # deflates well
    result = Explained("a.jpg", [3], ["x"], [0.5], (30, 40), None, ramp, ramp[None].clone())
    drawn = dict(pictures(result, {"png", "sheet"}))
    assert sorted(name.split("/")[0] for name in drawn) == ["overlays", "sheets"]
    folder = Parts(tmp_path, npz=False)
    folder.write_pictures(pictures(result, {"png", "sheet"}))
    for name, picture in drawn.items():
        raw = np.asarray(picture).nbytes
        with Image.open(tmp_path / name) as written:
            assert np.array_equal(np.asarray(written), np.asarray(picture))
        assert (tmp_path / name).stat().st_size < raw / 4


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "zlib"])
def test_deflate_round_trips_at_every_level(isal, monkeypatch):
    if isal and cam_io.isal_zlib is None:
        pytest.skip("isal is not installed")
    if not isal:  # zlib for the deflate (io) and for the chunks' CRCs (npz)
        monkeypatch.setattr(cam_io, "isal_zlib", None)
        monkeypatch.setattr(npz, "isal_zlib", None)
    rng = np.random.default_rng(0)
    data = np.repeat(rng.integers(0, 256, 2000, dtype=np.uint8), 32).tobytes()  # runs of 32
    for level in (0, 1, 3, 9):
        packed = cam_io.deflate(data, level)
        assert zlib.decompress(packed) == data
        assert (len(packed) > len(data)) if level == 0 else (len(packed) < len(data) / 4)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        cam_io.deflate(data, 10)
