"""Check the smallest model of each timm family and Hugging Face image classifier (random
weights, CPU): default layer, split kind, map grid, Grad-CAM against pytorch-grad-cam at the same
layer, CAM where the head allows it, ONNX export and its ONNX Runtime self-check.

Writes a markdown table (one row per model) to ``--out`` and prints each row as it is done. The
torchvision classifiers are ``scripts/check_torchvision_zoo.py``'s.

    python scripts/check_zoo.py [--only vit,hf_vit] [--out zoo.md] [--no-onnx]

Needs timm, transformers and grad-cam (the dev extra). Each model runs at 64 px where it accepts
that size (``img_size=``), else at its own size; a model taking longer than ``--timeout`` seconds
is reported as such.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import cam_engine as ce
from cam_engine.bench.models import LogitsOnly, calibrate_batchnorm, randomise_zero_linears

#: family -> (timm model, input size); 64 px with ``img_size=64`` where the model takes it
TIMM = {
    "resnet": ("resnet10t", 64),
    "resnext": ("resnext26ts", 64),
    "regnet": ("regnetx_002", 64),
    "efficientnet": ("efficientnet_b0", 64),
    "mobilenetv3": ("mobilenetv3_small_050", 64),
    "mobilenetv4": ("mobilenetv4_conv_small", 64),
    "ghostnet": ("ghostnet_050", 64),
    "lcnet": ("lcnet_050", 64),
    "convnext": ("convnext_atto", 64),
    "convnextv2": ("convnextv2_atto", 64),
    "densenet": ("densenet121", 64),
    "inception": ("inception_v3", 160),
    "xception": ("xception41", 96),
    "vgg": ("vgg11", 224),
    "repvgg": ("repvgg_a0", 64),
    "vit": ("vit_tiny_patch16_224", 64),
    "deit": ("deit_tiny_patch16_224", 64),
    "beit": ("beit_base_patch16_224", 64),
    "swin": ("swin_tiny_patch4_window7_224", 64),
    "swinv2": ("swinv2_cr_tiny_ns_224", 224),
    "cait": ("cait_xxs24_224", 64),
    "levit": ("levit_128s", 224),
    "mobilevit": ("mobilevit_xxs", 64),
    "efficientformer": ("efficientformer_l1", 224),
    "efficientformerv2": ("efficientformerv2_s0", 224),
    "poolformer": ("poolformer_s12", 64),
    "maxvit": ("maxvit_rmlp_pico_rw_256", 256),
    "coatnet": ("coatnet_nano_rw_224", 224),
    "pvt_v2": ("pvt_v2_b0", 64),
    "edgenext": ("edgenext_xx_small", 64),
    "fastvit": ("fastvit_t8", 64),
    "nfnet": ("nf_resnet26", 64),
    "hrnet": ("hrnet_w18_small", 64),
    "mixer": ("mixer_s32_224", 64),
    "resmlp": ("resmlp_12_224", 64),
    "coat_lite": ("coat_lite_tiny", 64),
    "pit": ("pit_ti_224", 64),
    "hiera": ("hiera_tiny_224", 224),
    "focalnet": ("focalnet_tiny_srf", 64),
}

_TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 64,
    "patch_size": 16,
}
_STAGES = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
#: Hugging Face model -> (config class, model class, config keywords, input size)
HF = {
    "hf_vit": ("ViTConfig", "ViTForImageClassification", _TINY_VIT, 64),
    "hf_deit": ("DeiTConfig", "DeiTForImageClassification", _TINY_VIT, 64),
    "hf_beit": ("BeitConfig", "BeitForImageClassification", _TINY_VIT, 64),
    "hf_dinov2": ("Dinov2Config", "Dinov2ForImageClassification", _TINY_VIT, 64),
    "hf_swin": (
        "SwinConfig",
        "SwinForImageClassification",
        {
            "image_size": 64,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [1, 2],
            "window_size": 4,
        },
        64,
    ),
    "hf_focalnet": (
        "FocalNetConfig",
        "FocalNetForImageClassification",
        {"image_size": 64, "embed_dim": 16, "depths": [1, 1], "hidden_sizes": [16, 32]},
        64,
    ),
    "hf_convnext": ("ConvNextConfig", "ConvNextForImageClassification", _STAGES, 64),
    "hf_resnet": (
        "ResNetConfig",
        "ResNetForImageClassification",
        {**_STAGES, "embedding_size": 8},
        64,
    ),
    "hf_regnet": (
        "RegNetConfig",
        "RegNetForImageClassification",
        {**_STAGES, "embedding_size": 8, "groups_width": 8},
        64,
    ),
    "hf_mobilevit": ("MobileViTConfig", "MobileViTForImageClassification", {"image_size": 64}, 64),
    "hf_efficientnet": (
        "EfficientNetConfig",
        "EfficientNetForImageClassification",
        {"image_size": 64},
        64,
    ),
    "hf_mobilenetv2": (
        "MobileNetV2Config",
        "MobileNetV2ForImageClassification",
        {"image_size": 64, "depth_multiplier": 0.35},
        64,
    ),
    "hf_levit": ("LevitConfig", "LevitForImageClassification", {}, 224),
}

COLUMNS = [
    "family",
    "model",
    "size",
    "default layer",
    "split",
    "map",
    "Grad-CAM vs pgc",
    "CAM",
    "ONNX",
]


def build_timm(name: str, size: int) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
    except TypeError:  # a model without img_size= runs at any size
        return timm.create_model(name, pretrained=False, num_classes=10)


def build_hf(config: str, model: str, kwargs: dict) -> nn.Module:
    import transformers

    return getattr(transformers, model)(getattr(transformers, config)(num_labels=10, **kwargs))


def pgc_error(model: nn.Module, layer: str, x: Tensor, res, size: int, hf: bool) -> str:
    """Max |engine - pytorch-grad-cam| of the Grad-CAM maps, relative to their max."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, prefix = (LogitsOnly(model), "model.") if hf else (model, "")
    try:
        module = net.get_submodule(prefix + layer)
    except AttributeError:
        return "n/a (FX node)"

    class Raw(pgc.GradCAM):
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    def transform(t: Tensor) -> Tensor:
        return ce.layout.to_nchw(t, None, (size, size))

    targets = [ClassifierOutputTarget(int(c)) for c in res.classes[:, 0]]
    with Raw(net, [module], reshape_transform=transform) as cam:
        cam(x, targets)
    model.zero_grad(set_to_none=True)
    expected = torch.from_numpy(np.maximum(np.asarray(cam.raw), 0)).double()
    got = res.cams[:, 0].double()
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    if scale == 0:
        return "zero maps"
    return f"{(got - expected).abs().max().item() / scale:.1e}"


def check(build: Callable[[], nn.Module], size: int, hf: bool, onnx: bool) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    model = calibrate_batchnorm(randomise_zero_linears(build()), torch.randn(4, 3, size, size))
    output = "logits" if hf else None
    engine = ce.CAMEngine(model, None, "gradcam", output=output, input_size=(size, size))
    layer = engine.target_layer
    res = engine(x)
    row = [layer, engine.split_kind, "x".join(map(str, res.cams.shape[2:]))]
    try:
        row.append(pgc_error(model, layer, x, res, size, hf))
    except Exception as exc:  # pytorch-grad-cam cannot hook a module returning a ModelOutput
        row.append(f"pgc failed: {type(exc).__name__}")
    try:
        ce.CAMEngine(model, layer, "cam", output=output, input_size=(size, size))(x)
        row.append("yes")
    except ValueError:
        row.append("no")
    if not onnx:
        return [*row, "-"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = ce.export.to_onnx(
                model,
                Path(tmp) / "m.onnx",
                target_layer=layer,
                method="gradcam",
                output=output,
                input_size=(size, size),
            )
            worst = max(result.errors.values(), default=float("nan"))
            row.append(f"ok, ORT err {worst:.1e}")
        except Exception as exc:  # reported as it is: the refusal's reason, or the error
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = text.partition("pool -> flatten -> MLP: ")[2]
            cell = f"refused: {reason[:70]}" if reason else f"{type(exc).__name__}: {text[:90]}"
            row.append(cell.replace("|", "/"))
    return row


def first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text.split(". ")[0][:90].replace("|", "/")


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated families / hf_ names")
    parser.add_argument("--out", default="zoo.md", help="the markdown table")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export column")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    cases = {
        **{
            f: (name, size, lambda n=name, s=size: build_timm(n, s), False)
            for f, (name, size) in TIMM.items()
        },
        **{
            f: (f"{m} (tiny config)", size, lambda c=c, m=m, k=k: build_hf(c, m, k), True)
            for f, (c, m, k, size) in HF.items()
        },
    }
    only = [n for n in args.only.split(",") if n]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    signal.signal(signal.SIGALRM, _alarm)
    for family, (name, size, build, hf) in cases.items():
        if only and family not in only:
            continue
        start = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            row = check(build, size, hf, not args.no_onnx)
        except Timeout:
            row = [f"timed out after {args.timeout} s"] + [""] * 5
        except Exception as exc:  # report every model, whatever breaks
            row = [f"FAIL {type(exc).__name__}: {first_sentence(exc)}"] + [""] * 5
        finally:
            signal.alarm(0)
        lines.append("| " + " | ".join([family, name, str(size), *row]) + " |")
        print(lines[-1], f"{time.perf_counter() - start:.0f}s", flush=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
