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
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
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
from ..loading import LoadedModel, load_model
from ..postprocess import available_colormaps, colormap_lut, heatmaps, overlay
from ..targets import BottomK, TopK

HELP = "explain image files and folders: overlays, contact sheets, predictions.csv, heatmaps.npz"

SAVE_CHOICES = ("png", "sheet", "npz")
#: longest side of a contact-sheet tile; overlays themselves are always at full size
SHEET_TILE = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and folders (recursive)"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a torchvision classifier name (resnet50, convnext_tiny, vit_b_16, ...); a file "
        "saved with torch.save(model) (unpickled with weights_only=False: it can run code, "
        "use trusted files only); or module:function / file.py:function returning a model",
    )
    parser.add_argument(
        "--weights",
        help="DEFAULT or a weights name of the torchvision model (IMAGENET1K_V2), or a "
        "state_dict file; default: none (random weights for a torchvision name)",
    )
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
        "--input-size",
        help="H,W (or S) the images are resized to for the model (aspect not kept); "
        "default: the weights' crop size, else 224",
    )
    parser.add_argument(
        "--mean", help="3 normalisation means (default: the weights' or ImageNet's)"
    )
    parser.add_argument("--std", help="3 normalisation stds (default: the weights' or ImageNet's)")
    parser.add_argument(
        "--num-classes", type=int, help="outputs of a torchvision model + state_dict"
    )
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


def _save_set(text: str) -> set[str]:
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(SAVE_CHOICES)
    if unknown:
        raise ValueError(f"--save: unknown {sorted(unknown)}; choose from {','.join(SAVE_CHOICES)}")
    return chosen


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from None


class _Writer:
    """Writes every output of one run; one :meth:`write` call per batch.

    The CSV and the NPZ are written in order on the calling thread; PNGs are encoded on a few
    threads (zlib releases the GIL), overlapping with the next batch's decoding and model.
    """

    def __init__(
        self, args: argparse.Namespace, loaded: LoadedModel, keys: list[str], stack: ExitStack
    ) -> None:
        self.out, self.loaded, self.keys = args.out, loaded, keys
        self.save = _save_set(args.save)
        self.colormap, self.alpha = args.colormap, args.alpha
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv = csv.writer(
            stack.enter_context(open(self.out / "predictions.csv", "w", newline=""))
        )
        self.csv.writerow(["image", "class_id", "class_name", "score"])
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
            for c, p in zip(classes[row], scores[row], strict=True):
                self.csv.writerow([self.keys[index], c, self.loaded.class_name(c), f"{p:.6g}"])
        if not self.save:
            return
        # Maps of same-size images are upsampled and coloured in one call.
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row, image in enumerate(batch.originals):
            by_size[tuple(image.shape[1:])].append(row)
        for size, rows in by_size.items():
            picked = torch.tensor(rows, device=cams.device)
            maps = heatmaps(cams.index_select(0, picked), size)
            images = torch.stack([batch.originals[r] for r in rows]).to(cams.device)
            overlays = overlay(images, maps, self.colormap, self.alpha).cpu()
            maps = maps.float().cpu()
            for i, row in enumerate(rows):
                key = self.keys[batch.indices[row]]
                if self.npz is not None:
                    self.npz.add(key, maps[i])
                titles = [Path(key).name] + [
                    f"{self.loaded.class_name(c)} p={p:.2f}"
                    for c, p in zip(classes[row], scores[row], strict=True)
                ]
                self._submit(key, batch.originals[row], overlays[i], classes[row], titles)

    def _submit(
        self, key: str, image: Tensor, overlays: Tensor, classes: list[int], titles: list[str]
    ) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        job = self.pool.submit(self._pictures, key, image, overlays, classes, titles)
        self.pending.append(job)

    def _pictures(
        self, key: str, image: Tensor, overlays: Tensor, classes: list[int], titles: list[str]
    ) -> None:
        """Overlay PNGs (K, 3, H, W) and the contact sheet of one image."""
        if "png" in self.save:
            for c, tile in zip(classes, overlays, strict=True):
                save_png(self.out / "overlays" / f"{key}.{c}.png", tile)
        if "sheet" in self.save:
            tiles = _shrink(torch.cat([image[None], overlays]))
            save_png(self.out / "sheets" / f"{key}.png", contact_sheet(tiles[None], [titles]))

    def finish(self) -> None:
        """Wait for the pictures still being written; the first failure is raised."""
        while self.pending:
            self.pending.popleft().result()


def _shrink(tiles: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 tiles scaled so that their longest side is at most ``SHEET_TILE``."""
    height, width = tiles.shape[-2:]
    scale = SHEET_TILE / max(height, width)
    if scale >= 1:
        return tiles
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return TF.resize(tiles, size, antialias=True)


def _explain(
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


def run(args: argparse.Namespace) -> int:
    # Cheap checks first: a typo should not wait for the model and the images.
    ce.methods.get(args.method)
    colormap_lut(args.colormap)
    targets = parse_targets(args.targets)
    _save_set(args.save)
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be >= 1 and --workers >= 0")
    device = _device(args.device)
    paths = find_images(args.images)
    keys = image_keys(paths)
    loaded = load_model(
        args.model,
        args.weights,
        device,
        labels=args.labels,
        input_size=_numbers(args.input_size, int, "--input-size"),
        mean=_numbers(args.mean, float, "--mean"),
        std=_numbers(args.std, float, "--std"),
        num_classes=args.num_classes,
    )
    engine = ce.CAMEngine(
        loaded.model, args.target_layer, args.method, input_size=loaded.input_size
    )
    print(
        f"explaining {len(paths)} images with {loaded.source} at {engine.target_layer!r} "
        f"({args.method}, {engine.split_kind} split, input {loaded.input_size[0]}x"
        f"{loaded.input_size[1]}) on {device} -> {args.out}",
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
                writer.write(batch, *_explain(engine, loaded, batch, targets))
            bar.update(len(batch.indices) + len(batch.skipped))
    elapsed = time.perf_counter() - start
    return _report(args.out, paths, keys, skipped, elapsed)


def _report(
    out: Path, paths: list[Path], keys: list[str], skipped: list[tuple[int, str]], elapsed: float
) -> int:
    """Write ``skipped.csv``, print the summary; 1 when no image could be read."""
    with open(out / "skipped.csv", "w", newline="") as file:
        table = csv.writer(file)
        table.writerow(["image", "reason"])
        table.writerows((keys[i], reason) for i, reason in skipped)
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
