"""``cam-engine explain`` end to end, and the io / loading helpers it is made of.

References are independent of the code under test: images decoded by PIL, maps from the hook-based
reference Grad-CAM in float64, upsampled and normalised here by hand, scores by a direct softmax.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn

import cam_engine as ce
from cam_engine import cli
from cam_engine.io import (
    ImageFolder,
    NpzWriter,
    collate,
    contact_sheet,
    find_images,
    image_keys,
    save_png,
)
from cam_engine.loading import load_model
from cam_engine.pipeline import parse_targets
from cam_engine.pipeline.outputs import picture_name
from cam_engine.reference import reference_gradcam

HERE = Path(__file__).resolve()
INPUT = 32
K = 2
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
LABELS = ["circle", "square", "triangle", "cross", "star"]
#: name -> (PIL mode, (H, W)); sizes deliberately odd and different from each other
IMAGES = {
    "a.jpg": ("RGB", (45, 61)),
    "sub/b.png": ("RGB", (50, 38)),
    "sub/deeper/c.JPEG": ("RGB", (33, 33)),
    "gray.png": ("L", (40, 29)),
    "palette.png": ("P", (27, 52)),
    "rgba.png": ("RGBA", (36, 44)),
}
CORRUPT = "broken.jpg"  # a JPEG signature followed by garbage
TRUNCATED = "sub/truncated.png"  # the first half of a valid PNG


def tiny_net() -> nn.Module:
    """A small GAP classifier, the same every call (a ``module:function`` for ``--model``)."""
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
    )
    head = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(16, 5))
    return nn.Sequential(OrderedDict(features=features, **head))


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, (mode, (h, w)) in IMAGES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # smooth random images (PIL and torchvision's libjpeg decode them to the same pixels)
        base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 4), dtype=np.uint8)
        image = Image.fromarray(base, "RGBA").resize((w, h), Image.BILINEAR)
        image = image.convert(mode) if mode != "P" else image.convert("RGB").quantize(16)
        image.save(path, format="JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG")
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    whole = (root / "sub/b.png").read_bytes()
    (root / TRUNCATED).write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.png")




def _explain_args(images: Path, out: Path, labels: Path, *extra: str) -> list[str]:
    return [
        "explain",
        str(images),
        "--model",
        f"{HERE}:tiny_net",
        "--target-layer",
        "features",
        "--labels",
        str(labels),
        "--input-size",
        str(INPUT),
        "--mean",
        ",".join(map(str, MEAN)),
        "--std",
        ",".join(map(str, STD)),
        "--targets",
        f"top{K}",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def explained(image_dir, labels_file, tmp_path_factory):
    """One in-process run over the folder (2 decoding workers, batches of 4)."""
    out = tmp_path_factory.mktemp("out")
    args = _explain_args(image_dir, out, labels_file, "--batch-size", "4", "--workers", "2")
    return cli.main(args), out


def _reference_input(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(original uint8 (3, H, W) decoded by PIL, normalised float64 model input (1, 3, S, S))."""
    original = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    resized = TF.resize(original, [INPUT, INPUT], antialias=True).double() / 255
    mean = torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    return original, ((resized - mean) / std)[None]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# explain end to end ---------------------------------------------------------------------------


def test_explain_writes_every_output(explained):
    rc, out = explained
    assert rc == 0
    for key in IMAGES:
        assert (out / "sheets" / f"{picture_name(key)}.png").is_file()
    rows = _read_csv(out / "predictions.csv")
    assert [r["image"] for r in rows] == [k for k in sorted(IMAGES) for _ in range(K)]
    for row in rows:
        path = out / "overlays" / f"{picture_name(row['image'])}.{row['class_id']}.png"
        assert path.is_file(), path
    assert len(list((out / "overlays").rglob("*.png"))) == len(IMAGES) * K


def test_overlays_have_original_sizes_and_match_heatmaps(explained, image_dir):
    _, out = explained
    maps = np.load(out / "heatmaps.npz")
    rows = _read_csv(out / "predictions.csv")
    for key, (_, size) in IMAGES.items():
        original, _ = _reference_input(image_dir / key)
        classes = [int(r["class_id"]) for r in rows if r["image"] == key]
        for k, c in enumerate(classes):
            png = Image.open(out / "overlays" / f"{picture_name(key)}.{c}.png")
            assert png.mode == "RGB" and png.size == (size[1], size[0])
            heat = torch.from_numpy(maps[key][k]).double()[None, None]
            # overlay by hand: round(0.5 * jet colour + 0.5 * pixel)
            colour = ce.postprocess.colormap_lut("jet")[(heat[0, 0] * 255).round().long()]
            expected = (0.5 * colour.double() + 0.5 * original.permute(1, 2, 0).double()).round()
            diff = (torch.from_numpy(np.array(png)).double() - expected).abs()
            assert diff.max() <= 1  # a .5 may round either way


def test_scores_are_softmax_of_the_model(explained, image_dir):
    _, out = explained
    model = tiny_net().double().eval()
    rows = _read_csv(out / "predictions.csv")
    for key in IMAGES:
        _, x = _reference_input(image_dir / key)
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        top = probs.topk(K)
        mine = [r for r in rows if r["image"] == key]
        assert [int(r["class_id"]) for r in mine] == top.indices.tolist()
        assert [r["class_name"] for r in mine] == [LABELS[i] for i in top.indices]
        scores = torch.tensor([float(r["score"]) for r in mine], dtype=torch.float64)
        # 6 significant digits in the file, a float32 model in the run
        torch.testing.assert_close(scores, top.values, rtol=2e-5, atol=0)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_npz_heatmaps_are_reference_gradcam_upsampled(explained, image_dir):
    _, out = explained
    maps = np.load(out / "heatmaps.npz")
    assert sorted(maps.files) == sorted(IMAGES)
    model = tiny_net().double().eval()
    rows = _read_csv(out / "predictions.csv")
    for key, (_, size) in IMAGES.items():
        _, x = _reference_input(image_dir / key)
        classes = torch.tensor([[int(r["class_id"]) for r in rows if r["image"] == key]])
        cams = reference_gradcam(model, model.features, x, classes).cams
        up = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)[0]
        lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
        expected = (up - lo) / (hi - lo)
        got = torch.from_numpy(maps[key])
        assert got.dtype == torch.float32 and got.shape == (K, *size)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_corrupt_files_are_skipped_and_listed(explained):
    _, out = explained
    skipped = _read_csv(out / "skipped.csv")
    assert [r["image"] for r in skipped] == [CORRUPT, TRUNCATED]  # sorted, as found
    assert all(r["reason"] and ".cpp" not in r["reason"] for r in skipped)
    assert not {CORRUPT, TRUNCATED} & {r["image"] for r in _read_csv(out / "predictions.csv")}


def test_console_script_with_bottom_and_class_ids(image_dir, labels_file, tmp_path):
    """The installed ``cam-engine`` script, ``module:function`` imported from the working dir."""
    script = Path(sys.executable).with_name("cam-engine")
    args = _explain_args(image_dir / "sub", tmp_path, labels_file, "--workers", "0")
    args[args.index("--model") + 1] = "test_explain:tiny_net"
    args[args.index("--targets") + 1] = "3,1"
    args += ["--save", "npz"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}  # this tree's cam_engine
    done = subprocess.run(
        [str(script), *args], cwd=HERE.parent, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "explained 2 of 3 images" in done.stderr and "truncated.png" in done.stderr
    rows = _read_csv(tmp_path / "predictions.csv")
    assert [(r["image"], r["class_name"]) for r in rows] == [
        ("b.png", "cross"),
        ("b.png", "square"),
        ("deeper/c.JPEG", "cross"),
        ("deeper/c.JPEG", "square"),
    ]
    assert not (tmp_path / "overlays").exists() and not (tmp_path / "sheets").exists()
    assert np.load(tmp_path / "heatmaps.npz")["b.png"].shape == (2, 50, 38)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--model", "resnet5"), "resnet50"),
        (("--target-layer", "featurs"), "features"),
        (("--method", "gradcan"), "gradcam"),
        (("--targets", "top0"), "at least 1"),
        (("--targets", "3,3"), "distinct"),
        (("--colormap", "jett"), "viridis"),
        (("--save", "png,gif"), "gif"),
        (("--input-size", "a"), "--input-size"),
    ],
)
def test_clean_errors(image_dir, labels_file, tmp_path, capsys, change, message):
    args = _explain_args(image_dir, tmp_path, labels_file)
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    try:
        code = cli.main(args)
    except SystemExit as exit_:  # argparse's usage errors: a malformed --input-size
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "cam-engine explain: error:" in err and message in err


def test_errors_for_inputs_and_labels(image_dir, tmp_path, capsys):
    wrong = tmp_path / "three.txt"
    wrong.write_text("a\nb\nc\n")
    assert cli.main(_explain_args(image_dir, tmp_path, wrong)) == 2
    assert "3 class names for a model with 5 outputs" in capsys.readouterr().err
    missing = _explain_args(tmp_path / "nope", tmp_path, wrong)
    assert cli.main(missing) == 2
    assert "no such file or folder" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    labels = tmp_path / "five.txt"
    labels.write_text("\n".join(LABELS))
    assert cli.main(_explain_args(only_bad, tmp_path / "o", labels)) == 1


# io ---------------------------------------------------------------------------------------------


def test_find_images_and_keys(image_dir, tmp_path):
    again = image_dir / "sub" / ".." / "a.jpg"
    found = find_images([image_dir / "sub", image_dir / "a.jpg", image_dir, again])
    keys = image_keys(found)
    # the folders' own order, each sorted; duplicates once; suffix case ignored; no hidden files
    assert keys[:4] == ["sub/b.png", "sub/deeper/c.JPEG", "sub/truncated.png", "a.jpg"]
    assert sorted(keys) == sorted([*IMAGES, CORRUPT, TRUNCATED])
    assert len(keys) == len(set(keys))
    assert image_keys([image_dir / "a.jpg"]) == ["a.jpg"]
    with pytest.raises(FileNotFoundError):
        find_images([image_dir / "missing"])
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no .jpg"):
        find_images([tmp_path])


def test_dataset_decodes_every_mode_to_rgb_and_collates_failures(image_dir):
    paths = [image_dir / k for k in ("gray.png", CORRUPT, "palette.png", "rgba.png")]
    data = ImageFolder(paths, (16, 12))
    batch = collate([data[i] for i in range(len(data))])
    assert batch.indices == [0, 2, 3] and batch.skipped[0][0] == 1
    assert batch.inputs.shape == (3, 3, 16, 12) and batch.inputs.dtype == torch.uint8
    for i, original in zip(batch.indices, batch.originals, strict=True):
        expected, _ = _reference_input(paths[i])
        assert torch.equal(original, expected)  # PNG: lossless, PIL and libpng agree exactly
    assert collate([data[1]]).inputs is None


def test_npz_writer_streams_arrays(tmp_path):
    arrays = {"a/1.jpg": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.eye(3)}
    with NpzWriter(tmp_path / "x.npz", compress=True) as npz:
        npz.add("a/1.jpg", torch.from_numpy(arrays["a/1.jpg"]))
        npz.add("b", arrays["b"])
        with pytest.raises(ValueError, match="duplicate"):
            npz.add("b", arrays["b"])
    loaded = np.load(tmp_path / "x.npz")
    assert sorted(loaded.files) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_save_png_round_trip(tmp_path):
    image = torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8)
    save_png(tmp_path / "deep" / "x.png", image)
    back = np.array(Image.open(tmp_path / "deep" / "x.png"))
    assert torch.equal(torch.from_numpy(back).permute(2, 0, 1), image)
    with pytest.raises(ValueError, match="uint8 RGB"):
        save_png(tmp_path / "y.png", image.float())


def test_contact_sheet_places_tiles_on_a_grid():
    tiles = torch.randint(0, 256, (2, 3, 3, 20, 30), dtype=torch.uint8)
    pad = 4
    sheet = contact_sheet(tiles, pad=pad)
    assert sheet.size == (3 * (30 + pad) + pad, 2 * (20 + pad) + pad)
    pixels = torch.from_numpy(np.array(sheet)).permute(2, 0, 1)
    for r in range(2):
        for c in range(3):
            y, x = pad + r * (20 + pad), pad + c * (30 + pad)
            assert torch.equal(pixels[:, y : y + 20, x : x + 30], tiles[r, c])
    titled = contact_sheet(tiles, [["input", "cat p=0.87", ""], ["a very long title " * 5] * 3])
    assert titled.width == sheet.width and titled.height > sheet.height
    dark = np.asarray(titled)[pad : pad + 10, pad : pad + 30].min()
    assert dark < 128  # some title ink above the first tile
    with pytest.raises(ValueError, match="titles"):
        contact_sheet(tiles, [["a"] * 3])
    with pytest.raises(ValueError, match="uint8"):
        contact_sheet(tiles.float())


def test_parse_targets():
    assert parse_targets("top3") == ce.TopK(3)
    assert parse_targets("bottom") == ce.BottomK(1)
    assert parse_targets("207, 282") == [207, 282]
    for bad in ("top0", "1,1", "-1", "best"):
        with pytest.raises(ValueError):
            parse_targets(bad)


# loading ----------------------------------------------------------------------------------------


def test_load_torchvision_name_with_a_state_dict_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    loaded = load_model("resnet18", str(tmp_path / "w.pt"), num_classes=7, input_size=[48, 40])
    assert not loaded.model.training
    for a, b in zip(loaded.model.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert loaded.input_size == (48, 40) and loaded.categories is None
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.class_name(3) == "class 3"
    with pytest.raises(ValueError, match="do not fit"):
        load_model("resnet18", str(tmp_path / "w.pt"))


def test_named_weights_give_transforms_and_categories(monkeypatch):
    """``--weights DEFAULT`` offline: the download is replaced by a random state_dict."""
    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(
        torchvision.models.WeightsEnum, "get_state_dict", lambda self, *a, **k: state
    )
    loaded = load_model("resnet18", "DEFAULT")
    meta = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert loaded.categories == meta.meta["categories"] and len(loaded.categories) == 1000
    assert loaded.input_size == (224, 224)
    assert loaded.mean == tuple(meta.transforms().mean)
    assert loaded.class_name(207) == "golden retriever"
    assert load_model("resnet18", "ResNet18_Weights.IMAGENET1K_V1").categories == loaded.categories
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_model("resnet18", "IMAGENET1K_V9")


def test_load_full_model_file_and_preprocess(tmp_path):
    model = tiny_net()
    torch.save(model, tmp_path / "full.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    loaded = load_model(str(tmp_path / "full.pt"), mean=MEAN, std=STD, allow_pickle=True)
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    expected = (images.double() / 255 - torch.tensor(MEAN).view(3, 1, 1).double()) / torch.tensor(
        STD
    ).view(3, 1, 1).double()
    torch.testing.assert_close(loaded.preprocess(images).double(), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(loaded.model(expected.float()), model(expected.float()))
    with pytest.raises(ValueError, match="state_dict"):
        load_model(str(tmp_path / "state.pt"))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="no function"):
        load_model(f"{HERE}:no_such_function")
