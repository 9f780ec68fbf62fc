"""Check the engine against pytorch-grad-cam on torchvision's detectors (random weights, CPU).

For each detector (Faster R-CNN mobilenet_v3_large_320_fpn, RetinaNet, FCOS, SSDlite;
``weights=None``, every detection kept): Grad-CAM of :class:`cam_engine.targets.BoxScore` on
each image's first two detections, moved by a few pixels, against pytorch-grad-cam's
``FasterRCNNBoxScoreTarget``, and Eigen-CAM, each at one backbone / FPN layer. Prints one line
per detector: the layer, its map size, the largest heatmap differences (pytorch-grad-cam's Eigen
map with the engine's fixed sign). The test suite checks Faster R-CNN only (tests/test_tasks.py).

    python scripts/check_detectors.py [--only retinanet] [--size 128] [--float32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from torchvision.models import detection

import cam_engine as ce
from cam_engine.bench.models import calibrate_batchnorm
from cam_engine.detection import detector


def _builders(size: int) -> dict:
    common = {"weights": None, "weights_backbone": None, "num_classes": 5}
    sized = {**common, "min_size": size, "max_size": size}
    return {
        "fasterrcnn": (
            lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(**sized, box_score_thresh=0.0),
            "backbone.fpn.layer_blocks.0",
        ),
        "retinanet": (
            lambda: detection.retinanet_resnet50_fpn(**sized, score_thresh=0.0),
            "backbone.fpn.layer_blocks.0",
        ),
        "fcos": (
            lambda: detection.fcos_resnet50_fpn(**sized, score_thresh=0.0),
            "backbone.fpn.layer_blocks.1",  # level 0: both random-weight maps ReLU to zero
        ),
        # SSDlite works at 320 px whatever the input: the images are resized to it
        "ssdlite": (
            lambda: detection.ssdlite320_mobilenet_v3_large(**common, score_thresh=0.0),
            None,  # cam_engine.detection.default_layer: backbone.features.0
        ),
    }


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalised maps; a flat one (all ReLU'd away) is zeros, as the engine's."""
    low = maps.amin((-2, -1), keepdim=True)
    span = maps.amax((-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), 0)


def check(name: str, size: int, dtype: torch.dtype) -> str:
    build, layer = _builders(size)[name]
    torch.manual_seed(0)
    model = build().eval()
    calibrate_batchnorm(model.backbone, torch.randn(4, 3, size, size))  # O(1) activations
    model = model.to(dtype)
    x = torch.rand(2, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        found = model(x)
    shift = torch.tensor([1.0, -0.5, 0.5, 1.0], dtype=dtype)
    boxes = [d["boxes"][:2] + shift for d in found]
    labels = [d["labels"][:2] for d in found]
    wrapped = detector(model, layer)
    layer = wrapped.target_layer
    res = ce.CAMEngine(wrapped, method="gradcam")(x, ce.targets.BoxScore(labels, boxes))
    targets = [FasterRCNNBoxScoreTarget(lab, box) for lab, box in zip(labels, boxes, strict=True)]
    module = model.get_submodule(layer)
    with pgc.GradCAM(model, [module]) as cam:
        expected = _minmax(torch.from_numpy(cam(x, targets)).to(dtype))
    gradcam_err = (res.heatmaps[:, 0] - expected).abs().max().item()
    flat = int((expected.flatten(1).amax(1) == 0).sum())

    eigen = ce.CAMEngine(wrapped, method="eigencam")(x)
    maps = {}
    hook = module.register_forward_hook(lambda m, i, o: maps.update(a=o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    projection = torch.from_numpy(
        pgc.utils.svd_on_activations.get_2d_projection(maps["a"].numpy())
    ).to(dtype)
    agreement = (projection * maps["a"].sum(1)).sum((-2, -1), keepdim=True)
    projection = torch.where(agreement < 0, -projection, projection).relu()
    up = F.interpolate(projection[:, None], size=(size, size), mode="bilinear")[:, 0]
    eigen_err = (eigen.heatmaps[:, 0] - _minmax(up)).abs().max().item()
    model.zero_grad(set_to_none=True)
    return (
        f"{name:11s} {layer:28s} map {tuple(res.cams.shape[2:])}  detections "
        f"{[len(d['boxes']) for d in found]}  gradcam {gradcam_err:.1e} ({flat} flat)  "
        f"eigencam {eigen_err:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated detectors (default: all)")
    parser.add_argument("--size", type=int, default=128, help="input side in pixels")
    parser.add_argument("--float32", action="store_true", help="float32 (default float64)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(_builders(args.size))
    dtype = torch.float32 if args.float32 else torch.float64
    for name in names:
        start = time.perf_counter()
        print(check(name, args.size, dtype), f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
