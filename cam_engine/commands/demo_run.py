"""The run of ``cam-engine demo`` (:mod:`cam_engine.commands.demo`): sheets, scores, speed."""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from PIL import Image

import cam_engine as ce

from ..demo import model as shapes_model
from ..demo import shapes
from ..io import contact_sheet, probability_text
from ..metrics import energy_pointing_game, pointing_game
from ..reference import reference_gradcam

#: images per split for the localisation scores (the sheets show the first ``--batch-size``)
EVAL_IMAGES = 128
#: the pointing game's 15 px tolerance at 224 px (Zhang et al. 2016), scaled to the 64 px images
TOLERANCE = round(15 * shapes_model.IMAGE_SIZE / 224)
#: seeds of the held-out demo batches, far from the training seeds (see ``demo.model.train``)
SINGLE_SEED, MULTI_SEED = 10**9, 10**9 + 1


def _methods(spec: str | None, preferred: tuple[str, ...]) -> list[str]:
    available = ce.methods.available()
    if spec is None:
        return [m for m in preferred if m in available]
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in available]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or spec!r}; available: {available}")
    return names


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def _enlarge(tiles: torch.Tensor, scale: int) -> torch.Tensor:
    """(R, C, 3, H, W) uint8 tiles, each pixel repeated ``scale`` x ``scale`` times."""
    return tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _model(args: argparse.Namespace) -> torch.nn.Module:
    if args.train:
        model = shapes_model.train(steps=args.steps)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / shapes_model.CHECKPOINT
        torch.save(model.state_dict(), path)
        print(f"saved {path} (copy it to cam_engine/demo/{shapes_model.CHECKPOINT} to ship it)")
        return model
    return shapes_model.pretrained(args.checkpoint)


def _single_sheet(engines: dict, data: shapes.ShapesBatch, scale: int) -> Image.Image:
    """Contact sheet rows: input, then each method's map of the predicted class."""
    columns, titles = [_to_uint8(data.images)], [[] for _ in range(len(data.images))]
    for i, label in enumerate(data.labels[:, 0].tolist()):
        titles[i].append(f"input: {shapes.CLASSES[label]}")
    for name, engine in engines.items():
        res = engine(data.images)
        columns.append(ce.overlay(_to_uint8(data.images), res.heatmaps)[:, 0])
        probs = res.logits.softmax(1).gather(1, res.classes)[:, 0]
        for i, (c, p) in enumerate(zip(res.classes[:, 0].tolist(), probs.tolist(), strict=True)):
            titles[i].append(f"{name}: {shapes.CLASSES[c]} {probability_text(p)}")
    return contact_sheet(_enlarge(torch.stack(columns, 1).cpu(), scale), titles)


def _multi_sheet(
    name: str, engine: ce.CAMEngine, data: shapes.ShapesBatch, scale: int
) -> Image.Image:
    """Contact sheet rows: input, then the map of each object's class (blank for empty slots)."""
    images = _to_uint8(data.images)
    res = engine(data.images, data.labels.clamp(min=0))
    overlays = ce.overlay(images, res.heatmaps)  # (B, 3, 3, H, W)
    overlays = torch.where(data.valid[..., None, None, None], overlays, 255)
    tiles = torch.cat([images[:, None], overlays], 1)
    titles = [
        ["input"] + [f"{name}: {shapes.CLASSES[c]}" if c >= 0 else "" for c in row]
        for row in data.labels.tolist()
    ]
    return contact_sheet(_enlarge(tiles.cpu(), scale), titles)


def _localisation(engines: dict, single, multi) -> dict[str, dict[str, float]]:
    """Pointing game (maximum within ``TOLERANCE`` px of the object) and energy pointing game."""
    scores = {}
    for name, engine in engines.items():
        one = engine(single.images, single.labels).heatmaps
        many = engine(multi.images, multi.labels.clamp(min=0)).heatmaps
        valid = multi.valid
        scores[name] = {
            "pointing_single": pointing_game(one, single.masks, TOLERANCE).float().mean().item(),
            "pointing_multi": pointing_game(many, multi.masks, TOLERANCE)[valid]
            .float()
            .mean()
            .item(),
            "energy_single": energy_pointing_game(one, single.masks).mean().item(),
            "energy_multi": energy_pointing_game(many, multi.masks)[valid].mean().item(),
        }
    return scores


def _images_per_second(fn, images: torch.Tensor, repeats: int = 3) -> float:
    fn(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return len(images) / sorted(times)[len(times) // 2]


def run(args: argparse.Namespace, preferred: tuple[str, ...]) -> int:
    """``cam-engine demo``; ``preferred``: the methods shown without ``--methods`` (if known)."""
    device = torch.device(args.device)
    names = _methods(args.methods, preferred)
    model = _model(args).to(device)
    single = shapes.single(EVAL_IMAGES, shapes_model.IMAGE_SIZE, SINGLE_SEED)
    multi = shapes.multi(EVAL_IMAGES, shapes_model.IMAGE_SIZE, MULTI_SEED)
    single, multi = (
        shapes.ShapesBatch(d.images.to(device), d.labels.to(device), d.masks.to(device))
        for d in (single, multi)
    )
    engines = {name: ce.CAMEngine(model, "features", name) for name in names}
    args.out.mkdir(parents=True, exist_ok=True)

    accuracy = shapes_model.accuracy(model, single)
    print(f"ShapesNet accuracy on {EVAL_IMAGES} held-out images: {accuracy:.3f}")
    b = args.batch_size
    first = shapes.ShapesBatch(single.images[:b], single.labels[:b], single.masks[:b])
    _single_sheet(engines, first, args.scale).save(args.out / "single.png")
    first = shapes.ShapesBatch(multi.images[:b], multi.labels[:b], multi.masks[:b])
    _multi_sheet(names[0], engines[names[0]], first, args.scale).save(args.out / "multi.png")

    scores = _localisation(engines, single, multi)
    area = single.masks.float().mean().item()
    print(f"\nlocalisation, {EVAL_IMAGES} images per split (objects cover {area:.1%} of an image)")
    print(f"pointing game: the map's maximum within {TOLERANCE} px of the object (15 px at 224 px)")
    print(f"{'method':<12} {'pointing 1-obj':>15} {'pointing multi':>15} {'energy 1-obj':>13}")
    for name, s in scores.items():
        print(
            f"{name:<12} {s['pointing_single']:>15.3f} {s['pointing_multi']:>15.3f}"
            f" {s['energy_single']:>13.3f}"
        )

    images = single.images[:64]
    engine_ips = _images_per_second(engines.get("gradcam") or engines[names[0]], images)
    layer = model.features
    with warnings.catch_warnings():  # the hook way's own complaint about input without grad
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        hook_ips = _images_per_second(lambda x: reference_gradcam(model, layer, x), images)
    print(
        f"\nGrad-CAM on {len(images)} images ({device}): engine {engine_ips:,.0f} images/s, "
        f"hook-based reference {hook_ips:,.0f} images/s ({engine_ips / hook_ips:.1f}x)"
    )
    summary = {
        "accuracy": accuracy,
        "object_area": area,
        "localisation": scores,
        "speed_images_per_s": {"engine": engine_ips, "hook_reference": hook_ips},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    written = ", ".join(str(args.out / f) for f in ("single.png", "multi.png", "summary.json"))
    print(f"\nwrote {written}")
    return 0
