"""cam_engine.npz: the archive against numpy's own writer, Python's zipfile and Info-ZIP."""

from __future__ import annotations

import doctest
import io
import os
import shutil
import subprocess
import zipfile
import zlib

import numpy as np
import pytest
import torch

from cam_engine import npz
from cam_engine.npz import NpzWriter, crc32

ARRAYS = {
    "maps": np.random.default_rng(0).random((2, 30, 40), dtype=np.float32),
    "sub/dir/x.jpg": np.arange(12, dtype=np.int64).reshape(3, 4),
    "façade.png": np.array([True, False]),
    "empty": np.zeros((0, 3), np.int16),
    "scalar": np.float64(3.5),
    "record": np.frombuffer(b'[{"name": "a"}]', np.uint8),
    "big-endian": np.arange(5, dtype=">i4"),
}


def _write(path, arrays, compress=False):
    with NpzWriter(path, compress=compress) as writer:
        for key, value in arrays.items():
            writer.add(key, value)


def _members(file) -> dict[str, bytes]:
    with zipfile.ZipFile(file) as archive:
        assert archive.testzip() is None  # every CRC checked
        return {info.filename: archive.read(info) for info in archive.infolist()}


@pytest.mark.parametrize("compress", [False, True])
def test_members_are_numpys_own(tmp_path, compress):
    """Each member holds the bytes numpy.savez(_compressed) stores, and numpy reads it back."""
    path = tmp_path / "a.npz"
    _write(path, ARRAYS, compress)
    reference = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(reference, **ARRAYS)
    assert _members(path) == _members(reference)
    with np.load(path) as loaded:
        assert sorted(loaded.files) == sorted(ARRAYS)
        for key, value in ARRAYS.items():
            assert loaded[key].dtype == value.dtype and loaded[key].shape == np.shape(value)
            np.testing.assert_array_equal(loaded[key], value)
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert infos["façade.png.npy"].flag_bits & 0x800  # a UTF-8 name says so
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    assert {info.compress_type for info in infos.values()} == {method}


def test_tensors_and_non_contiguous_arrays(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    _write(tmp_path / "a.npz", {"t": t.transpose(1, 2), "f": fortran, "s": fortran[:, ::2]})
    with np.load(tmp_path / "a.npz") as loaded:
        np.testing.assert_array_equal(loaded["t"], t.transpose(1, 2).numpy())
        np.testing.assert_array_equal(loaded["f"], fortran)
        np.testing.assert_array_equal(loaded["s"], fortran[:, ::2])


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_moves_members_as_stored(tmp_path, monkeypatch, kernel_copy):
    """Copied members keep their stored bytes and CRC, stored or deflated (numpy's own file)."""
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    _write(tmp_path / "ours.npz", ARRAYS)
    np.savez_compressed(tmp_path / "numpys.npz", **ARRAYS)
    with NpzWriter(tmp_path / "merged.npz") as merged:
        merged.add("first", np.ones(3))
        merged.copy(tmp_path / "ours.npz", {"maps": "a/maps", "façade.png": "façade.png"})
        merged.copy(tmp_path / "numpys.npz", {"maps": "b/maps", "scalar": "scalar"})
        merged.add("last", np.zeros(2))
    members = _members(tmp_path / "merged.npz")
    ours, numpys = _members(tmp_path / "ours.npz"), _members(tmp_path / "numpys.npz")
    assert members["a/maps.npy"] == ours["maps.npy"] == numpys["maps.npy"]
    with (
        zipfile.ZipFile(tmp_path / "merged.npz") as archive,
        zipfile.ZipFile(tmp_path / "numpys.npz") as source,
    ):
        copied, original = archive.getinfo("b/maps.npy"), source.getinfo("maps.npy")
        assert copied.compress_type == zipfile.ZIP_DEFLATED
        assert (copied.CRC, copied.compress_size) == (original.CRC, original.compress_size)
    with np.load(tmp_path / "merged.npz") as loaded:
        assert loaded.files == ["first", "a/maps", "façade.png", "b/maps", "scalar", "last"]
        np.testing.assert_array_equal(loaded["b/maps"], ARRAYS["maps"])
        np.testing.assert_array_equal(loaded["last"], np.zeros(2))


def test_bad_keys(tmp_path):
    _write(tmp_path / "a.npz", {"a": np.ones(2)})
    with NpzWriter(tmp_path / "b.npz") as writer:
        writer.add("x", np.ones(1))
        with pytest.raises(ValueError, match="duplicate NPZ key 'x'"):
            writer.add("x", np.ones(1))
        with pytest.raises(ValueError, match="duplicate NPZ key 'x'"):
            writer.copy(tmp_path / "a.npz", {"a": "x"})
        with pytest.raises(KeyError, match="no array 'missing'"):
            writer.copy(tmp_path / "a.npz", {"missing": "y"})
        with pytest.raises(ValueError, match="object arrays"):
            writer.add("o", np.array([{}], dtype=object))
        writer.add("o", np.zeros(1))  # a failed add leaves its key free
    with np.load(tmp_path / "b.npz") as loaded:
        assert loaded.files == ["x", "o"]


def test_zip64_records(tmp_path, monkeypatch):
    """Sizes, offsets and a member count past ZIP's 32 / 16-bit fields (here: past lowered
    thresholds, so the test writes kilobytes, not gigabytes) go to ZIP64 records that numpy,
    zipfile and Info-ZIP's unzip read."""
    monkeypatch.setattr(npz, "_ZIP64_SIZE", 1000)
    monkeypatch.setattr(npz, "_ZIP64_COUNT", 3)
    arrays = {f"a{i}": np.full(100 * i, i, np.float32) for i in range(6)}
    _write(tmp_path / "src.npz", arrays)
    with NpzWriter(tmp_path / "z.npz") as writer:
        writer.copy(tmp_path / "src.npz", {k: k for k in arrays})
        writer.add("b", np.arange(400, dtype=np.float64))
    for name in ("src.npz", "z.npz"):
        data = (tmp_path / name).read_bytes()
        assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # the ZIP64 end records
        with zipfile.ZipFile(tmp_path / name) as archive:
            assert archive.testzip() is None
            assert archive.getinfo("a5.npy").file_size == 128 + 4 * 500
        if shutil.which("unzip"):
            subprocess.run(["unzip", "-tq", str(tmp_path / name)], check=True)
    with np.load(tmp_path / "z.npz") as loaded:
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)
        np.testing.assert_array_equal(loaded["b"], np.arange(400, dtype=np.float64))


def test_crc32_is_zlibs():
    data = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8)
    assert crc32(data) == zlib.crc32(data.tobytes())
    assert crc32(b"IDAT", 7) == zlib.crc32(b"IDAT", 7)


def test_docstring_example():
    assert doctest.testmod(npz, raise_on_error=True).attempted >= 1
