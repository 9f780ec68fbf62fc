"""``cam-engine explain``: heatmaps of image files and folders, written as pictures and arrays.

Images are decoded and resized in DataLoader workers, explained a batch at a time by
:class:`cam_engine.CAMEngine`, and each map is upsampled from the target layer's resolution
straight to its image's original size. Outputs in ``--out``:

- ``predictions.csv``: image, class_id, class_name, score (softmax probability), one row per
  explained class, in the order of the maps;
- ``overlays/<image>.<class_id>.png`` (``--save png``): each map over its image, original size;
- ``sheets/<image>.png`` (``--save sheet``): the image and its overlays side by side, titled;
- ``heatmaps.npz`` (``--save npz``): ``numpy.load(path)["<image>"]`` is a float32 (K, H, W)
  array in [0, 1], the K maps of that image at its original size, in the CSV's order;
- ``skipped.csv``: image, reason, for files that could not be decoded (header only if none).

``<image>`` is the image's path relative to the folder shared by all inputs (``a/1.jpg``).

With ``--ray [ADDRESS]`` the same images are explained on a Ray cluster by
:mod:`cam_engine.distributed`, with the helpers below (:func:`load`, :func:`explain_batch`,
:func:`original_size_maps`, :func:`pictures`), so both ways give the same outputs.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import cam_engine as ce

from ..io import (
    Batch,
    ImageFolder,
    NpzWriter,
    collate,
    contact_sheet,
    find_images,
    image_keys,
    save_png,
)
from ..loading import LoadedModel, add_model_arguments, load_model, resolve_device
from ..postprocess import available_colormaps, colormap_lut, heatmaps, overlay
from ..targets import BottomK, TopK

HELP = "explain image files and folders: overlays, contact sheets, predictions.csv, heatmaps.npz"

SAVE_CHOICES = ("png", "sheet", "npz")
PREDICTION_COLUMNS = ["image", "class_id", "class_name", "score"]
#: longest side of a contact-sheet tile; overlays themselves are always at full size
SHEET_TILE = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and folders (recursive)"
    )
    add_model_arguments(parser)
    parser.add_argument("--labels", type=Path, help="class names, one per line (line i = class i)")
    parser.add_argument("--target-layer", help="module or FX node name (default: last feature map)")
    parser.add_argument(
        "--method", default="gradcam", help=f"one of {', '.join(ce.methods.available())}"
    )
    parser.add_argument(
        "--targets",
        default="top1",
        help="classes to explain per image: topK, bottomK or class ids (207,282); default top1",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--workers", type=int, default=min(4, _cpu_count()), help="image decoding processes"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the model up to the target layer through torch.compile (the first batch "
        "compiles, which takes seconds to minutes; measured 1.07x the eager images/s of "
        "resnet50 on a CPU, 1.0x for vgg16)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feed the model channels-last images up to the target layer (default: on a CPU "
        "only, where it measured 1.02x to 1.53x the images/s of torchvision's CNNs)",
    )
    parser.add_argument(
        "--input-size",
        help="H,W (or S) the images are resized to for the model (aspect not kept); "
        "default: the weights' crop size, else 224",
    )
    parser.add_argument(
        "--mean", help="3 normalisation means (default: the weights' or ImageNet's)"
    )
    parser.add_argument("--std", help="3 normalisation stds (default: the weights' or ImageNet's)")
    parser.add_argument(
        "--colormap", default="jet", help=f"one of {', '.join(available_colormaps())}"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the colour overlay")
    parser.add_argument("--out", type=Path, default=Path("out/explain"), help="output folder")
    parser.add_argument(
        "--save",
        default="png,sheet,npz",
        help=f"comma-separated, of {','.join(SAVE_CHOICES)} (predictions.csv is always written)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help='explain on a Ray cluster (pip install "cam-engine[ray]"): auto, host:6379 or '
        "ray://host:10001; bare --ray (after the images) starts a local one. Resumable: a rerun "
        "skips the images already done in --out; npz means heatmaps in Parquet shards",
    )
    parser.add_argument(
        "--actors",
        type=int,
        help="with --ray: model replicas (default: one per GPU of the cluster, else one per CPU)",
    )


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_targets(text: str) -> TopK | BottomK | list[int]:
    """``"top3"`` -> ``TopK(3)``, ``"bottom2"`` -> ``BottomK(2)``, ``"7,2"`` -> ``[7, 2]``."""
    ranked = re.fullmatch(r"(top|bottom)(\d*)", text.strip().lower())
    if ranked:
        k = int(ranked[2] or 1)
        if k < 1:
            raise ValueError(f"--targets {text}: k must be at least 1")
        return TopK(k) if ranked[1] == "top" else BottomK(k)
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--targets {text!r}: use topK, bottomK or comma-separated class ids"
        ) from None
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(f"--targets {text!r}: class ids must be distinct and >= 0")
    return ids


def _numbers(text: str | None, kind: type, what: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in re.split(r"[,x]", text)]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers") from None


def parse_save(text: str) -> set[str]:
    """``"png,npz"`` -> ``{"png", "npz"}``; ``ValueError`` for a name not in ``SAVE_CHOICES``."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(SAVE_CHOICES)
    if unknown:
        raise ValueError(f"--save: unknown {sorted(unknown)}; choose from {','.join(SAVE_CHOICES)}")
    return chosen


def _device(name: str | None) -> torch.device:
    return resolve_device(name)


class _Writer:
    """Writes every output of one run; one :meth:`write` call per batch.

    The CSV and the NPZ are written in order on the calling thread; PNGs are encoded on a few
    threads (zlib releases the GIL), overlapping with the next batch's decoding and model.
    """

    def __init__(
        self, args: argparse.Namespace, loaded: LoadedModel, keys: list[str], stack: ExitStack
    ) -> None:
        self.out, self.loaded, self.keys = args.out, loaded, keys
        self.save = parse_save(args.save)
        self.colormap, self.alpha = args.colormap, args.alpha
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv = csv.writer(
            stack.enter_context(open(self.out / "predictions.csv", "w", newline=""))
        )
        self.csv.writerow(PREDICTION_COLUMNS)
        self.npz = None
        if "npz" in self.save:
            self.npz = stack.enter_context(NpzWriter(self.out / "heatmaps.npz"))
        threads = max(1, min(4, _cpu_count()))
        self.pool = stack.enter_context(ThreadPoolExecutor(threads, "cam-engine-png"))
        self.pending: deque[Future] = deque()
        self.max_pending = 4 * threads  # bounds the overlays held in memory
        stack.callback(self.finish)

    def write(self, batch: Batch, cams: Tensor, classes: Tensor, scores: Tensor) -> None:
        """Outputs of the batch's images.

        Args:
            batch: the decoded images (originals at their own sizes).
            cams: (B, K, h, w) maps from the engine, on the model's device.
            classes: (B, K) explained class ids; scores: (B, K) their probabilities.
        """
        classes, scores = classes.tolist(), scores.tolist()
        for row, index in enumerate(batch.indices):
            names = [self.loaded.class_name(c) for c in classes[row]]
            self.csv.writerows(prediction_rows(self.keys[index], classes[row], names, scores[row]))
        if not self.save:
            return
        colormap = self.colormap if self.save & {"png", "sheet"} else None
        for row, maps, overlays in original_size_maps(batch, cams, colormap, self.alpha):
            key = self.keys[batch.indices[row]]
            if self.npz is not None:
                self.npz.add(key, maps)
            if overlays is not None:
                names = [self.loaded.class_name(c) for c in classes[row]]
                found = pictures(
                    key, batch.originals[row], overlays, classes[row], names, scores[row], self.save
                )
                self._submit(found)

    def _submit(self, found: Iterator[tuple[str, Tensor | Image.Image]]) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._pictures, found))

    def _pictures(self, found: Iterator[tuple[str, Tensor | Image.Image]]) -> None:
        """Write the overlay PNGs and the contact sheet of one image."""
        for name, picture in found:
            save_png(self.out / name, picture)

    def finish(self) -> None:
        """Wait for the pictures still being written; the first failure is raised."""
        while self.pending:
            self.pending.popleft().result()


def original_size_maps(
    batch: Batch, cams: Tensor, colormap: str | None, alpha: float
) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """Each image's heatmaps at its original size, and their overlays.

    Maps of same-size images are upsampled (and coloured) in one call, on the maps' device.

    Args:
        batch: the decoded images (originals at their own sizes).
        cams: (B, K, h, w) maps from the engine.
        colormap: the overlays' colour map, or ``None`` for no overlays.
        alpha: weight of the colour in the overlays.

    Yields:
        (row in the batch, heatmaps (K, H, W) float32 in [0, 1] on the CPU, overlays
        (K, 3, H, W) uint8 on the CPU or ``None``), grouped by image size.
    """
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row, image in enumerate(batch.originals):
        by_size[tuple(image.shape[1:])].append(row)
    for size, rows in by_size.items():
        picked = torch.tensor(rows, device=cams.device)
        maps = heatmaps(cams.index_select(0, picked), size)
        overlays = None
        if colormap is not None:
            images = torch.stack([batch.originals[r] for r in rows]).to(cams.device)
            overlays = overlay(images, maps, colormap, alpha).cpu()
        maps = maps.float().cpu()
        for i, row in enumerate(rows):
            yield row, maps[i], None if overlays is None else overlays[i]


def pictures(
    key: str,
    image: Tensor,
    overlays: Tensor,
    classes: list[int],
    names: list[str],
    scores: list[float],
    save: set[str],
) -> Iterator[tuple[str, Tensor | Image.Image]]:
    """The overlay PNGs and the contact sheet of one image, rendered when iterated.

    Args:
        key: the image's key; image: (3, H, W) uint8 original; overlays: (K, 3, H, W) uint8.
        classes, names, scores: the K explained classes, their names and probabilities.
        save: which pictures (``"png"``, ``"sheet"``; other names are ignored).

    Yields:
        (path relative to the output folder, picture for :func:`cam_engine.io.save_png`).
    """
    if "png" in save:
        for c, tile in zip(classes, overlays, strict=True):
            yield f"overlays/{key}.{c}.png", tile
    if "sheet" in save:
        titles = [Path(key).name] + [
            f"{name} p={p:.2f}" for name, p in zip(names, scores, strict=True)
        ]
        tiles = _shrink(torch.cat([image[None], overlays]))
        yield f"sheets/{key}.png", contact_sheet(tiles[None], [titles])


def _shrink(tiles: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 tiles scaled so that their longest side is at most ``SHEET_TILE``."""
    height, width = tiles.shape[-2:]
    scale = SHEET_TILE / max(height, width)
    if scale >= 1:
        return tiles
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return TF.resize(tiles, size, antialias=True)


def explain_batch(
    engine: ce.CAMEngine, loaded: LoadedModel, batch: Batch, targets: TopK | BottomK | list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(cams (B, K, h, w), classes (B, K), softmax scores (B, K)) of a decoded batch."""
    x = loaded.preprocess(batch.inputs)
    if isinstance(targets, list):
        targets = torch.tensor(targets).expand(len(x), -1)
    res = engine(x, targets)
    loaded.check_num_classes(res.logits.shape[1])
    scores = res.logits.float().softmax(1).gather(1, res.classes)
    return res.cams, res.classes, scores


def check_args(args: argparse.Namespace) -> TopK | BottomK | list[int]:
    """The cheap checks, so that a typo does not wait for the model and the images.

    Returns:
        The parsed ``--targets``.
    """
    ce.methods.get(args.method)
    colormap_lut(args.colormap)
    targets = parse_targets(args.targets)
    parse_save(args.save)
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be >= 1 and --workers >= 0")
    if args.actors is not None and args.actors < 1:
        raise ValueError("--actors must be >= 1")
    if args.device is not None:
        _device(args.device)
    return targets


def load(
    args: argparse.Namespace, device: torch.device, state: dict[str, Tensor] | None = None
) -> tuple[LoadedModel, ce.CAMEngine]:
    """The model named by the arguments, on ``device``, and its engine.

    ``state``: a ``state_dict`` loaded into the model before the engine is built (so that
    every Ray actor runs the driver's weights, random ones included).
    """
    loaded = load_model(
        args.model,
        args.weights,
        device,
        labels=args.labels,
        input_size=_numbers(args.input_size, int, "--input-size"),
        mean=_numbers(args.mean, float, "--mean"),
        std=_numbers(args.std, float, "--std"),
        num_classes=args.num_classes,
        allow_pickle=args.allow_pickle,
    )
    if state is not None:
        loaded.model.load_state_dict(state)
    engine = ce.CAMEngine(
        loaded.model,
        args.target_layer,
        args.method,
        input_size=loaded.input_size,
        compile=args.compile,
        channels_last=args.channels_last,
    )
    return loaded, engine


def run(args: argparse.Namespace) -> int:
    targets = check_args(args)
    if args.ray is not None:
        try:
            from ..distributed import run as run_on_ray  # Ray is an optional extra
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        return run_on_ray(args)
    device = _device(args.device)
    paths = find_images(args.images)
    keys = image_keys(paths)
    loaded, engine = load(args, device)
    split = f"{engine.split_kind} split" + (", trunk compiled" if args.compile else "")
    if engine.model.current().channels_last:
        split += ", channels-last input"
    height, width = loaded.input_size
    print(
        f"explaining {len(paths)} images with {loaded.source} at {engine.target_layer!r} "
        f"({args.method}, {split}, input {height}x{width}) on {device} -> {args.out}",
        file=sys.stderr,
    )
    loader = DataLoader(
        ImageFolder(paths, loaded.input_size),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    skipped: list[tuple[int, str]] = []
    start = time.perf_counter()
    with ExitStack() as stack:
        writer = _Writer(args, loaded, keys, stack)
        bar = stack.enter_context(tqdm(total=len(paths), unit="img", desc="explain"))
        for batch in loader:
            skipped += batch.skipped
            if batch.inputs is not None:
                writer.write(batch, *explain_batch(engine, loaded, batch, targets))
            bar.update(len(batch.indices) + len(batch.skipped))
    elapsed = time.perf_counter() - start
    return _report(args.out, paths, keys, skipped, elapsed)


def _report(
    out: Path, paths: list[Path], keys: list[str], skipped: list[tuple[int, str]], elapsed: float
) -> int:
    """Write ``skipped.csv``, print the summary; 1 when no image could be read."""
    with open(out / "skipped.csv", "w", newline="") as file:
        write_skipped(file, [(keys[i], reason) for i, reason in skipped])
    done = len(paths) - len(skipped)
    print(
        f"explained {done} of {len(paths)} images in {elapsed:.1f} s "
        f"({done / max(elapsed, 1e-9):.1f} images/s) -> {out}",
        file=sys.stderr,
    )
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable images (see {out / 'skipped.csv'}):",
            file=sys.stderr,
        )
        for i, reason in skipped:
            print(f"  {paths[i]}: {reason}", file=sys.stderr)
    return 0 if done else 1


def prediction_rows(
    key: str, classes: list[int], names: list[str], scores: list[float]
) -> list[list]:
    """``predictions.csv`` rows of one image (see :data:`PREDICTION_COLUMNS`), one per class."""
    return [[key, c, name, f"{p:.6g}"] for c, name, p in zip(classes, names, scores, strict=True)]


def write_skipped(file: TextIO, rows: list[tuple[str, str]]) -> None:
    """``skipped.csv``: the header ``image, reason`` and one row per unreadable image."""
    table = csv.writer(file)
    table.writerow(["image", "reason"])
    table.writerows(rows)
