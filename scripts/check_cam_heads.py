"""Check ``method="cam"`` (closed form) on the global-average-pool heads of timm, torchvision and
Hugging Face models (random weights, small sizes, CPU), and optionally its ONNX export.

For each model: the head is read as global-average-pool -> linear, and CAM's raw maps equal
``h*w`` times Grad-CAM's computed by autograd (``closed_form=False``) at the same layer. With
``--export``, ``to_onnx(method="cam")`` writes and self-checks a file (ONNX Runtime against the
engine). Prints one line per model: layer, split kind, map size, relative error (and export
error).

    python scripts/check_cam_heads.py [--only swin,hf_resnet] [--export]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
import transformers as hf
from torch import nn

import cam_engine as ce
from cam_engine.bench.models import calibrate_batchnorm, randomise_zero_linears
from cam_engine.export import to_onnx


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, num_classes=5, **kwargs)


def _hf_regnet() -> nn.Module:
    config = hf.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=5
    )
    return hf.RegNetForImageClassification(config)


def _hf_resnet() -> nn.Module:
    config = hf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return hf.ResNetForImageClassification(config)


def _hf_mobilenet_v2() -> nn.Module:
    config = hf.MobileNetV2Config(depth_multiplier=0.25, num_labels=5, image_size=64)
    return hf.MobileNetV2ForImageClassification(config)


def _hf_mobilevit() -> nn.Module:
    config = hf.MobileViTConfig(
        image_size=64, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
        num_labels=5, num_attention_heads=1,
    )  # fmt: skip
    return hf.MobileViTForImageClassification(config)


def _sequencer() -> nn.Module:
    from timm.models.sequencer import Sequencer2d

    dims = dict(layers=(1,) * 4, embed_dims=(16,) * 4, hidden_sizes=(8,) * 4)
    return Sequencer2d(num_classes=5, **dims)


def _nest() -> nn.Module:
    from timm.models.nest import Nest

    return Nest(img_size=64, patch_size=4, embed_dims=(16, 32, 32), num_heads=(1, 1, 1),
                depths=(1, 1, 1), num_classes=5)  # fmt: skip


# name -> (model factory, target layer (None: the default))
MODELS: dict[str, tuple[Callable[[], nn.Module], str | None]] = {
    "regnet": (_timm("regnetx_002"), None),
    "resnext26ts": (_timm("resnext26ts"), None),
    "repvgg": (_timm("repvgg_a0"), None),
    "rexnet": (_timm("rexnet_100"), None),
    "xception41": (_timm("xception41"), None),
    "maxvit_rw": (_timm("maxvit_rmlp_pico_rw_256", img_size=64), None),
    "coatnet_rw": (_timm("coatnet_nano_rw_224", img_size=64), None),
    "focalnet": (_timm("focalnet_tiny_srf"), None),
    "gcvit": (_timm("gcvit_xxtiny", img_size=64), "stages"),  # the default fails to trace
    "botnet": (_timm("botnet26t_256", img_size=64), "final_conv"),  # the same
    "swin": (
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            window_size=4,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(1, 2),
        ),
        None,
    ),  # fmt: skip
    "swinv2": (
        _timm(
            "swinv2_tiny_window8_256",
            img_size=64,
            window_size=4,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(1, 2),
        ),
        None,
    ),  # fmt: skip
    "sequencer": (_sequencer, None),
    "nest": (_nest, None),
    "tv_swin_t": (lambda: torchvision.models.swin_t(num_classes=5), "norm"),
    "hf_resnet": (_hf_resnet, "resnet.encoder"),
    "hf_regnet": (_hf_regnet, "regnet.encoder"),
    "hf_mobilenet_v2": (_hf_mobilenet_v2, "mobilenet_v2.conv_1x1"),
    "hf_mobilevit": (_hf_mobilevit, "mobilevit.conv_1x1_exp"),
}
SIZE = 64


def _calibrated(model: nn.Module) -> nn.Module:
    """The model in eval mode with activations of order one, so that maps are not all zero.

    Random-init BatchNorm statistics (0, 1) do not fit the activations, which vanish layer after
    layer (HF MobileViT's last map is exactly zero); one train-mode batch sets them. A
    zero-initialised classifier gets random rows.
    """
    return calibrate_batchnorm(randomise_zero_linears(model), torch.randn(8, 3, SIZE, SIZE))


def check(name: str, export: bool) -> str:
    factory, layer = MODELS[name]
    torch.manual_seed(0)
    model = _calibrated(factory())
    x = torch.randn(2, 3, SIZE, SIZE)
    engine = ce.CAMEngine(model, layer, "cam", input_size=(SIZE, SIZE))
    if engine.model.gap_linear is None:
        return f"{name:16s} FAIL no closed form at {engine.target_layer!r}"
    cam = engine(x, ce.TopK(2))
    grad = ce.CAMEngine(model, layer, "gradcam", input_size=(SIZE, SIZE), closed_form=False)
    ref = grad(x, cam.classes).cams * cam.cams[0, 0].numel()
    scale = ref.abs().max().item()
    err = (cam.cams - ref).abs().max().item() / (scale or 1.0)
    verdict = "ok" if err < 1e-4 else "FAIL"
    if scale == 0:  # random weights can leave every map at zero after the ReLU
        verdict = "ok (all maps zero: vacuous)" if err == 0 else "FAIL"
    line = (
        f"{name:16s} {verdict} layer={engine.target_layer} "
        f"kind={engine.model.split_kind} map={tuple(cam.cams.shape[2:])} cam/gradcam err={err:.1e}"
    )
    if export:
        with tempfile.TemporaryDirectory() as folder:
            try:
                result = to_onnx(model, Path(folder) / "m.onnx", layer, method="cam",
                                 input_size=(SIZE, SIZE))  # fmt: skip
                line += f" export err={max(result.errors.values()):.1e}"
            except Exception as exc:  # report and go on with the next model
                line += f" export FAIL {type(exc).__name__}: {str(exc)[:160]}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    parser.add_argument("--export", action="store_true", help="also export and self-check")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(MODELS)
    warnings.simplefilter("ignore")
    for name in names:
        start = time.perf_counter()
        try:
            line = check(name, args.export)
        except Exception as exc:  # report and go on with the next model
            line = f"{name:16s} FAIL {type(exc).__name__}: {str(exc)[:200]}"
        print(f"{line} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
