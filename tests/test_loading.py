"""The model loader shared by ``explain`` and ``export``: pickle opt-in, random weights, errors.

References are independent of the loader: the PyTorch module the test built (its logits against
ONNX Runtime's), marker files a malicious pickle would create, and torch's own device queries.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

import cam_engine.export
from cam_engine import cli
from cam_engine.loading import load_model, resolve_device

HERE = Path(__file__).resolve()
SIZE = 32


def tiny_net() -> nn.Module:
    """A small GAP classifier with 5 outputs, the same every call (``--model HERE:tiny_net``)."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    head = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 5))
    return nn.Sequential(OrderedDict(features=features, **head))


class _Payload:
    """Unpickling it creates the folder ``marker``: what a malicious model file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a .pt file whose unpickling runs code, the marker that code creates)."""
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    return tmp_path / "evil.pt", marker


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "images" / "a.png"
    path.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _explain(image: Path, out: Path, *model_args: str) -> list[str]:
    return [
        "explain",
        str(image),
        "--input-size",
        str(SIZE),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--save",
        "",
        "--out",
        str(out),
        *model_args,
    ]


def _one_line_error(err: str, command: str) -> str:
    """The error line of ``err``, which must be that line alone (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cam-engine {command}: error: "), err
    return lines[0]


# one loader ---------------------------------------------------------------------------------------


def _ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"x": x.numpy()})[0]


@pytest.mark.parametrize("spelling", ["--model", "positional"])
def test_export_loads_factories_and_state_dicts_like_explain(tmp_path, spelling):
    """``export`` takes ``module:function`` + ``--weights state_dict`` (it knew neither)."""
    torch.manual_seed(7)
    trained = tiny_net()
    for p in trained.parameters():
        nn.init.normal_(p)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "w.pt")
    out = tmp_path / "m.onnx"
    spec = f"{HERE}:tiny_net"
    model = ["--model", spec] if spelling == "--model" else [spec]
    args = ["export", *model, str(out), "--weights", str(tmp_path / "w.pt")]
    assert cli.main([*args, "--input-size", str(SIZE), str(SIZE), "--no-check"]) == 0
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, untrained = trained.eval()(x), tiny_net().eval()(x)
    assert not torch.allclose(expected, untrained, atol=1e-3)  # the weights file mattered
    np.testing.assert_allclose(_ort_logits(out, x), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_export_model_given_twice_or_not_at_all(tmp_path, capsys):
    spec, out = f"{HERE}:tiny_net", str(tmp_path / "m.onnx")
    assert cli.main(["export", spec, out, "--model", spec]) == 2
    assert "--model" in _one_line_error(capsys.readouterr().err, "export")
    assert cli.main(["export", out]) == 2
    assert "--model" in _one_line_error(capsys.readouterr().err, "export")
    assert not Path(out).exists()


# pickle opt-in ------------------------------------------------------------------------------------


def test_model_pickle_needs_allow_pickle(evil):
    path, marker = evil
    with pytest.raises(ValueError, match="allow_pickle|--allow-pickle"):
        load_model(str(path))
    assert not marker.exists()
    with pytest.raises(ValueError, match="NoneType"):  # os.mkdir returned None: not a model
        load_model(str(path), allow_pickle=True)
    assert marker.exists()  # the payload is real: the flag is what let it run


@pytest.mark.parametrize("command", ["explain", "export"])
def test_cli_refuses_pickles_without_the_flag(command, evil, image, tmp_path, capsys):
    path, marker = evil
    if command == "explain":
        args = _explain(image, tmp_path / "out", "--model", str(path))
    else:
        args = ["export", "--model", str(path), str(tmp_path / "m.onnx")]
    assert cli.main(args) == 2
    assert "--allow-pickle" in _one_line_error(capsys.readouterr().err, command)
    assert not marker.exists()


def test_full_model_file_loads_with_the_flag(tmp_path):
    model = tiny_net().eval()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(ValueError, match="--allow-pickle"):
        load_model(str(tmp_path / "full.pt"))
    loaded = load_model(str(tmp_path / "full.pt"), allow_pickle=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert not loaded.random_weights


def test_weights_files_are_never_unpickled(evil):
    path, marker = evil
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_model(f"{HERE}:tiny_net", str(path), allow_pickle=True)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file")
@pytest.mark.filterwarnings(r"ignore:`torch.jit.\w+` is deprecated")
def test_torchscript_model_file(tmp_path):
    torch.jit.script(tiny_net()).save(tmp_path / "ts.pt")
    for allow_pickle in (False, True):
        with pytest.raises(ValueError, match="TorchScript"):
            load_model(str(tmp_path / "ts.pt"), allow_pickle=allow_pickle)


# random weights -----------------------------------------------------------------------------------


def test_random_weights_flag(tmp_path):
    random = load_model("resnet18", num_classes=3)
    assert random.random_weights and "random weights" in random.source.lower()
    torch.save(random.model.state_dict(), tmp_path / "w.pt")
    for loaded in (load_model("resnet18", str(tmp_path / "w.pt"), num_classes=3),
                   load_model(f"{HERE}:tiny_net")):
        assert not loaded.random_weights and "random weights" not in loaded.source.lower()


def test_explain_says_random_weights(image, tmp_path, capsys):
    random = ["--model", "resnet18", "--num-classes", "3"]
    assert cli.main(_explain(image, tmp_path / "r", *random)) == 0
    assert "random weights" in capsys.readouterr().err.lower()
    torch.save(tiny_net().state_dict(), tmp_path / "w.pt")
    weights = ["--weights", str(tmp_path / "w.pt")]
    assert cli.main(_explain(image, tmp_path / "t", "--model", f"{HERE}:tiny_net", *weights)) == 0
    err = capsys.readouterr().err
    assert "explaining 1 images" in err and "random weights" not in err.lower()


def test_export_says_random_weights(tmp_path, capsys, monkeypatch):
    """The ONNX export itself is replaced: what is checked is the model and the start line."""
    exported = []

    class Stop(Exception):
        pass

    def fake_to_onnx(model, path, **settings):
        exported.append((model, settings))
        raise Stop  # the start line is printed by now

    monkeypatch.setattr(cam_engine.export, "to_onnx", fake_to_onnx)
    with pytest.raises(Stop):
        cli.main(["export", "--model", "resnet18", "--num-classes", "3", str(tmp_path / "m.onnx")])
    assert "random weights" in capsys.readouterr().err.lower()
    (model, settings), = exported
    assert model.fc.out_features == 3 and not model.training
    assert settings["input_size"] == (224, 224)
    assert settings["mean"] == (0.485, 0.456, 0.406) and settings["std"] == (0.229, 0.224, 0.225)


# errors -------------------------------------------------------------------------------------------

GARBAGE = {
    "empty": b"",
    "text": b"hello\n",
    "random": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
}


@pytest.mark.parametrize("kind", [*GARBAGE, "truncated"])
def test_unreadable_weights_file(kind, tmp_path):
    path = tmp_path / "w.pt"
    if kind == "truncated":
        torch.save(tiny_net().state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(GARBAGE[kind])
    with pytest.raises(ValueError, match=f"cannot read weights file {path}"):
        load_model(f"{HERE}:tiny_net", str(path))
    with pytest.raises(ValueError, match=f"cannot read model file {path}"):
        load_model(str(path))


def test_cli_unreadable_weights_is_one_line(image, tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(GARBAGE["random"])
    weights = ["--weights", str(tmp_path / "w.pt")]
    assert cli.main(_explain(image, tmp_path / "o", "--model", "resnet18", *weights)) == 2
    assert "cannot read weights file" in _one_line_error(capsys.readouterr().err, "explain")


def test_cli_os_errors_are_one_line(image, tmp_path, capsys):
    too_long = "m" * 300 + ".pt"  # longer than any file system's name limit (255)
    assert cli.main(_explain(image, tmp_path / "o", "--model", too_long)) == 2
    assert "too long" in _one_line_error(capsys.readouterr().err, "explain")


def test_cli_programming_errors_keep_their_traceback(tmp_path, monkeypatch):
    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr("cam_engine.commands.export.run", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["export", "--model", "resnet18", str(tmp_path / "m.onnx")])


# devices ------------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_resolve_device_without_gpu(no_gpu):
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no cuda device"):
            resolve_device(name)
    with pytest.raises(ValueError, match="'gpu'"):
        resolve_device("gpu")


def test_resolve_device_with_one_gpu(one_gpu):
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="1 cuda device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("command", ["explain", "bench"])
def test_cli_device_without_gpu(command, no_gpu, image, tmp_path, capsys):
    if command == "explain":
        args = _explain(image, tmp_path / "o", "--model", "resnet18")
        args[args.index("cpu")] = "cuda"
    else:
        args = ["bench", "--quick", "--device", "cuda", "--out", str(tmp_path / "b")]
    assert cli.main(args) == 2
    assert "no cuda device" in _one_line_error(capsys.readouterr().err, command)
