"""Load a classifier for the command line: by torchvision name, from a file, or from a factory.

``load_model`` returns the model in eval mode together with what is needed to feed it (input
size, mean, std) and to name its classes, taken from the torchvision weights when there are some.
``add_model_arguments`` (from :mod:`cam_engine.arguments`, which needs no torch) gives every
command the same options for it, ``resolve_device`` the same ``--device``.

Files are read with ``torch.load(weights_only=True)``, which cannot run code; a model saved whole
(a pickle, which can) is unpickled only when the caller opts in with ``allow_pickle``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pickle
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

# the command line's options live in a module without torch (so that --help needs none); they
# are this module's public names too
from .arguments import add_model_arguments, add_run_arguments, parse_input_size, size_pair

__all__ = [
    "LoadedModel",
    "add_model_arguments",
    "add_run_arguments",
    "parse_input_size",
    "size_pair",
    "load_model",
    "read_labels",
    "resolve_device",
    "torchvision_models",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = (224, 224)
_FACTORY = re.compile(r"^(?P<module>[^:]+):(?P<function>[A-Za-z_][\w.]*)$")
#: how torch's weights-only unpickler names the class or function a pickle would have imported
_PICKLED_GLOBAL = re.compile(r"GLOBAL (\S+)")
#: torch.load reports a damaged file with whatever exception the damage triggers (fuzzing gave
#: all of these); with weights_only=False a missing class is an AttributeError or ImportError
_UNREADABLE = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    KeyError,
    IndexError,
    ValueError,
    AttributeError,
    ImportError,
)


@dataclass
class LoadedModel:
    """A classifier ready to explain, and how to feed it.

    Attributes:
        model: the ``nn.Module``, in eval mode, on the requested device.
        input_size: (H, W) the images are resized to.
        mean, std: per-channel normalisation of images scaled to [0, 1].
        categories: class names indexed by class id, or ``None`` (then "class 17").
        source: how the model was found, for messages (``"torchvision resnet50
            (ResNet50_Weights.IMAGENET1K_V2)"``, a path...); it says "RANDOM WEIGHTS" when
            ``random_weights``.
        random_weights: the model is a torchvision architecture given no weights, so its maps
            explain an untrained network. (A model from a file or a factory has the weights
            that came with it.)
    """

    model: nn.Module
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: list[str] | None
    source: str
    random_weights: bool = False

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) -> normalised float (B, 3, H, W) on the model's device.

        The images are copied as uint8 (4x less than float) and converted on the device, in the
        dtype of the model's parameters.
        """
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else images.device
        dtype = param.dtype if param is not None else torch.float32
        x = images.to(device, non_blocking=True).to(dtype).div_(255)
        mean = torch.tensor(self.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def class_name(self, index: int) -> str:
        """The name of class ``index``; ``"class 17"`` when the model has no names."""
        if self.categories is None:
            return f"class {index}"
        return self.categories[index]

    def check_num_classes(self, num_classes: int) -> None:
        """``ValueError`` unless the class names (if any) match the model's ``num_classes``."""
        if self.categories is not None and len(self.categories) != num_classes:
            raise ValueError(
                f"{len(self.categories)} class names for a model with {num_classes} outputs; "
                "pass --labels with one name per output"
            )


def torchvision_models() -> list[str]:
    """Names of torchvision's image classification models."""
    return torchvision.models.list_models(module=torchvision.models)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line, line ``i`` naming class ``i``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"the labels file {path} is empty")
    return [line.strip() for line in lines]


def _unknown_model(spec: str) -> ValueError:
    names = torchvision_models()
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown model {spec!r}.{hint} Give a torchvision classification model name "
        f"({len(names)} of them, e.g. resnet50, convnext_tiny, vit_b_16), a file saved with "
        "torch.save(model), or module:function returning a model"
    )


def _named_weights(model_name: str, weights: str) -> WeightsEnum | None:
    """torchvision weights named ``weights`` (member or full enum name); ``None`` for a file."""
    enum = torchvision.models.get_model_weights(model_name)
    if weights in enum.__members__:
        return enum[weights]
    if Path(weights).is_file():
        return None
    try:
        return torchvision.models.get_weight(weights)
    except (ValueError, KeyError, AttributeError):
        members = ", ".join(enum.__members__)
        raise ValueError(
            f"--weights {weights!r} is neither a file nor weights of {model_name} ({members}, or "
            f"a full name such as {enum.__name__}.DEFAULT)"
        ) from None


def _gist(exc: BaseException) -> str:
    """The exception's type and last line, without torch's advice to retry unsafely."""
    lines = [
        line.strip()
        for line in str(exc).splitlines()
        if line.strip() and not line.startswith("Check the documentation of torch.load")
    ]
    last = lines[-1].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {last}" if last else type(exc).__name__


def _torch_load(path: str, what: str, pickle_hint: str, *, weights_only: bool) -> object:
    """``torch.load`` of a user's file onto the CPU; ``ValueError`` when it cannot be read.

    A TorchScript archive is refused too: it has no Python modules for the engine to split.

    Args:
        path: the file; what: how messages name it ("model file").
        pickle_hint: what to do about a pickle that ``weights_only`` refused to unpickle.
        weights_only: ``False`` unpickles, which runs whatever code the file holds.
    """
    torchscript = f"{path} is a TorchScript model; cam-engine needs the Python model"
    try:
        found = torch.load(path, map_location="cpu", weights_only=weights_only)
    except _UNREADABLE as exc:
        if "TorchScript" in str(exc):  # weights_only refuses TorchScript archives
            raise ValueError(torchscript) from None
        pickled = _PICKLED_GLOBAL.search(str(exc)) if weights_only else None
        if pickled is not None:
            raise ValueError(
                f"cannot read {what} {path} without unpickling it (it loads {pickled[1]}); "
                + pickle_hint
            ) from None
        raise ValueError(
            f"cannot read {what} {path}: not written by torch.save, or damaged ({_gist(exc)})"
        ) from exc
    if isinstance(found, torch.jit.ScriptModule):
        raise ValueError(torchscript)
    return found


def _load_state_dict(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no such weights file: {path} (named weights such as DEFAULT need a torchvision "
            "model name for --model)"
        )
    hint = (
        "a weights file is a state_dict and is never unpickled; a model saved whole with "
        "torch.save(model) is given as --model FILE, with --allow-pickle"
    )
    state = _torch_load(path, "weights file", hint, weights_only=True)
    for key in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"the weights in {path} do not fit the model: {exc}") from exc


def _from_torchvision(name: str, named: WeightsEnum | None, num_classes: int | None) -> nn.Module:
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        return torchvision.models.get_model(name, weights=named, **kwargs)
    except OSError as exc:  # no network, or a proxy in the way
        raise ValueError(
            f"could not download the {named} weights ({exc}); save them on a machine with access "
            "and pass the file with --weights PATH"
        ) from exc


def _import_factory(spec: str) -> nn.Module:
    match = _FACTORY.match(spec)
    module_name, function = match["module"], match["function"]
    if module_name.endswith(".py"):
        if not Path(module_name).is_file():
            raise FileNotFoundError(f"no such file: {module_name}")
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        # `python -m` would find modules in the working directory; a console script does not
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ValueError(f"cannot import {module_name!r} for --model {spec}: {exc}") from exc
    factory = module
    for part in function.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no function {function!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _from_file(path: str, allow_pickle: bool) -> nn.Module:
    hint = (
        "unpickling can run any code the file holds, so a model saved whole with "
        "torch.save(model) needs --allow-pickle (allow_pickle=True): pass it if you trust the file"
    )
    model = _torch_load(path, "model file", hint, weights_only=not allow_pickle)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{path} holds a {type(model).__name__}, not a model saved with torch.save(model); "
            "for a state_dict use --model ARCHITECTURE --weights PATH"
        )
    return model


def load_model(
    spec: str,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    *,
    labels: str | os.PathLike | None = None,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """A classifier in eval mode on ``device``, with its preprocessing facts and class names.

    Args:
        spec: a torchvision classification model name (see :func:`torchvision_models`); a path
            to a model saved whole with ``torch.save(model)`` (needs ``allow_pickle``); or
            ``module:function`` / ``file.py:function``, called with no argument.
        weights: for a torchvision name, ``"DEFAULT"``, a member name (``"IMAGENET1K_V2"``) or a
            full name (``"ResNet50_Weights.IMAGENET1K_V2"``); for any spec, a ``state_dict`` file
            (read with ``weights_only=True``, whatever ``allow_pickle`` says).
            ``None``: the model's own weights (random for a torchvision name: see
            :attr:`LoadedModel.random_weights`).
        device: where to put the model.
        labels: a text file with one class name per line (overrides the weights' names).
        input_size: (H, W) or (S,); default the weights' crop size, else 224 x 224.
        mean, std: normalisation; default the weights' own, else ImageNet's.
        num_classes: outputs of a torchvision model built without named weights.
        allow_pickle: unpickle a model file (``weights_only=False``), which runs any code the
            file holds: trusted files only. Without it a pickled model file is refused.

    Raises:
        ValueError: unknown model name (with the closest names), weights that do not fit, a
            file that is damaged, not from ``torch.save``, or a pickle without ``allow_pickle``.
        FileNotFoundError: a missing model, weights or labels file.
        OSError: a file that cannot be opened (permissions, a name too long...).
    """
    named, random_weights = None, False
    if spec in torchvision_models():
        named = _named_weights(spec, weights) if weights is not None else None
        if num_classes is not None and named is not None:
            raise ValueError("--num-classes applies to models built without named weights")
        model = _from_torchvision(spec, named, num_classes)
        source = f"torchvision {spec}" + (f" ({named})" if named is not None else "")
        random_weights = weights is None
        if random_weights:
            source += " with RANDOM WEIGHTS (no --weights)"
    elif num_classes is not None:
        raise ValueError("--num-classes applies to torchvision model names only")
    elif _FACTORY.match(spec) and not Path(spec).exists():
        model, source = _import_factory(spec), spec
    elif Path(spec).is_file():
        model, source = _from_file(spec, allow_pickle), spec
    elif os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth")):
        raise FileNotFoundError(f"no such model file: {spec}")
    else:
        raise _unknown_model(spec)
    if weights is not None and named is None:
        _load_state_dict(model, weights)

    facts = named.transforms() if named is not None else None
    if input_size is None and facts is not None:
        input_size = facts.crop_size
    size = size_pair(input_size or DEFAULT_INPUT_SIZE)
    mean = tuple(mean or (facts.mean if facts is not None else IMAGENET_MEAN))
    std = tuple(std or (facts.std if facts is not None else IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
    if labels is not None:
        categories = read_labels(labels)
    elif named is not None:
        categories = list(named.meta["categories"])
    else:
        categories = None
    model = model.eval().to(device)
    return LoadedModel(model, size, mean, std, categories, source, random_weights)


def resolve_device(name: str | None) -> torch.device:
    """The torch device ``--device name`` asks for, checked to exist on this machine.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``...; ``None``: CUDA when it is
            available, else the CPU.

    Raises:
        ValueError: a name torch does not know, a device type this machine does not have
            (``cuda`` without a GPU), an index past its last device.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from None
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu...
    if device.type == "cpu" or not hasattr(backend, "is_available"):
        return device  # a backend without the query is left to torch's own errors
    if not backend.is_available():
        raise ValueError(
            f"--device {name}: no {device.type} device on this machine (torch "
            f"{torch.__version__}); use --device cpu"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if device.index is not None and count is not None and device.index >= count:
        raise ValueError(
            f"--device {name}: this machine has {count} {device.type} device(s), "
            f"{device.type}:0 to {device.type}:{count - 1}"
        )
    return device
