"""Split every torchvision classifier at its default layer and check it (random weights, CPU).

For each model: the split model's logits equal the original's, and a top-2 Grad-CAM call returns
finite (B, 2, H, W) heatmaps. Prints one line per model: split kind, default layer, whether the
closed form applies, map size, max logit difference. With ``--onnx`` each model is also exported
(``to_onnx`` at its default layer: CAM where the head is GAP -> linear, else Grad-CAM) and the
file's self-check against the PyTorch engine (ONNX Runtime, batch 3) is reported.

    python scripts/check_torchvision_zoo.py [--skip vit_h_14,regnet_y_128gf] [--only resnet50]
                                            [--onnx]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

import cam_engine as ce


def export_line(model: torch.nn.Module, engine: ce.CAMEngine, size: int) -> str:
    """``to_onnx`` at the engine's layer and its self-check's largest error, or why it failed."""
    from cam_engine.export import to_onnx

    method = "cam" if engine.model.gap_linear is not None else "gradcam"
    with tempfile.TemporaryDirectory() as folder:
        try:
            result = to_onnx(model, Path(folder) / "m.onnx", engine.target_layer, method=method,
                             topk=2, input_size=(size, size))  # fmt: skip
        except Exception as exc:  # report every model, whatever breaks
            return f"onnx=FAIL {type(exc).__name__}: {str(exc)[:160]}"
    return f"onnx={method}/{result.metadata['head']} onnx_err={max(result.errors.values()):.1e}"


def check(name: str, onnx: bool = False) -> str:
    kwargs = (
        {"aux_logits": False, "init_weights": False}
        if name in ("googlenet", "inception_v3")
        else {}
    )
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(2, 3, size, size)
    engine = ce.CAMEngine(model, None, "gradcam", input_size=(size, size))
    with torch.no_grad():
        expected = model(x)
        logits, _ = engine.model(x)
    res = engine(x, targets=ce.TopK(2))
    err = (logits - expected).abs().max().item()
    ok = (
        err <= 1e-4 * max(1.0, expected.abs().max().item())
        and res.heatmaps.shape == (2, 2, size, size)
        and bool(torch.isfinite(res.heatmaps).all())
    )
    line = (
        f"{'OK ' if ok else 'BAD'} kind={engine.split_kind} layer={engine.target_layer} "
        f"gap={engine.model.gap_linear is not None} map={tuple(res.cams.shape[2:])} "
        f"logit_err={err:.1e}"
    )
    return f"{line} {export_line(model, engine, size)}" if onnx else line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="vit_h_14,regnet_y_128gf", help="comma-separated names")
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    parser.add_argument("--onnx", action="store_true", help="also export and self-check each")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    names = (
        args.only.split(",") if args.only else torchvision.models.list_models(torchvision.models)
    )
    failures = skipped = 0
    for name in names:
        if name in args.skip.split(","):
            print(f"{name:24s} skipped")
            skipped += 1
            continue
        start = time.perf_counter()
        try:
            line = check(name, args.onnx)
        except Exception as exc:  # report every model, whatever breaks
            line = f"FAIL {type(exc).__name__}: {str(exc)[:200]}"
        failures += not line.startswith("OK")
        print(f"{name:24s} {line} {time.perf_counter() - start:.1f}s", flush=True)
    print(f"{len(names) - failures - skipped} ok, {failures} not ok, {skipped} skipped")
    return int(failures > 0)


if __name__ == "__main__":
    raise SystemExit(main())
