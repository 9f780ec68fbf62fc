"""The models benchmarked: torchvision classifiers, random-init, with calibrated BatchNorm.

No pretrained weights can be downloaded on the machines this runs on, and timings do not depend
on the weights' values, except through denormal numbers: random-init BatchNorm statistics give
activations of order 1e-13 that drift into denormals, which run far slower on CPUs. One batch of
cumulative BatchNorm statistics gives O(1) activations, as in a trained model.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torchvision
from torch import Tensor, nn

from ..model import OutputSelector, select_output

__all__ = [
    "AUTOCAST",
    "COMPILE_MODES",
    "LogitsOnly",
    "ModelSpec",
    "build_model",
    "calibrate_batchnorm",
    "example_batch",
    "randomise_zero_linears",
]

#: ``--autocast`` names and their dtypes
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: ``--compile-mode`` choices: ``torch.compile``'s modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same model in another process.

    Attributes:
        name: a torchvision classifier builder (``"resnet50"``, ``"vgg16"``).
        size: input height and width.
        seed: seed of the random initialisation and of the calibration batch.
        device: torch device string.
        channels_last: store weights (and feed inputs) in channels-last memory format.
        autocast: ``"bf16"`` or ``"fp16"``: the PyTorch backends run under ``torch.autocast``
            of that dtype (the model is built and calibrated in float32).
        compile_mode: ``torch.compile``'s ``mode`` for the ``engine-compile`` backend
            (``"reduce-overhead"``: CUDA graphs); ``None``: its default.
    """

    name: str
    size: int = 224
    seed: int = 0
    device: str = "cpu"
    channels_last: bool = False
    autocast: str | None = None
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        if self.autocast is not None and self.autocast not in AUTOCAST:
            raise ValueError(
                f"autocast must be one of {', '.join(AUTOCAST)}, not {self.autocast!r}"
            )
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, not {self.compile_mode!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` as :attr:`autocast` asks on the spec's device; else a no-op."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=AUTOCAST[self.autocast])


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics of one batch ``x`` (B, 3, H, W), then ``eval()``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def randomise_zero_linears(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Normal(0, ``std``) weights, from torch's global generator (seed it first), for every
    ``nn.Linear`` of ``model`` whose weights are all zero; the others are left as they are.

    torchvision's ViT and timm's Mixer, ResMLP and Hiera zero-initialise their classifier: at
    random init no gradient reaches the features, and every Grad-CAM map is zero.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=std)
    return model


class LogitsOnly(nn.Module):
    """``model`` returning its logits alone, as the hook-based libraries call a model (a Hugging
    Face classifier returns a ``ModelOutput``); its layers are under ``model.``.

    Args:
        model: the model.
        output: where its logits are, as :func:`cam_engine.model.select_output` takes it.
    """

    def __init__(self, model: nn.Module, output: OutputSelector = "logits") -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        return select_output(self.model(x), self.output)


def build_model(spec: ModelSpec) -> nn.Module:
    """The classifier of ``spec``, float32, in eval mode, on ``spec.device``."""
    if not hasattr(torchvision.models, spec.name):
        names = ", ".join(torchvision.models.list_models(module=torchvision.models)[:12])
        raise ValueError(f"unknown torchvision model {spec.name!r}; e.g. {names}, ...")
    torch.manual_seed(spec.seed)
    kwargs = {"aux_logits": False, "init_weights": False} if spec.name == "googlenet" else {}
    model = getattr(torchvision.models, spec.name)(weights=None, **kwargs)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    calibration = torch.randn(8, 3, spec.size, spec.size, generator=generator)
    model = calibrate_batchnorm(model, calibration).to(spec.device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def example_batch(spec: ModelSpec, batch: int, seed: int = 2) -> torch.Tensor:
    """A reproducible (B, 3, size, size) float32 batch on ``spec.device``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, spec.size, spec.size, generator=generator).to(spec.device)
    return x.contiguous(memory_format=torch.channels_last) if spec.channels_last else x
