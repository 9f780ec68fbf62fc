"""``.npz`` files written array by array, and arrays copied between them byte for byte.

An ``.npz`` file is a ZIP archive of ``<key>.npy`` members (``numpy.load`` reads it). This
module writes the archive itself, since every member's size is known before it is written: each
member is one local header, the ``.npy`` header and the array's bytes, written from the array's
memory with no copy and no seeking back; its CRC-32 is ISA-L's when the ``isal`` package is
installed (3.5x zlib's speed, the same value). :meth:`NpzWriter.copy` moves members of another
archive as they are stored, CRC included: a run's per-batch parts merge into one file without
decoding, re-encoding or re-checksumming the heatmaps (the kernel copies the bytes where it can).

ZIP64 records are written where a size, an offset or the member count needs them (ZIP's APPNOTE
4.5.3, as Python's ``zipfile`` does), so files over 4 GiB and over 65535 arrays work.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from torch import Tensor

try:
    from isal import isal_zlib
except ImportError:  # a platform without its wheel
    isal_zlib = None

__all__ = ["NpzWriter", "crc32"]

_LOCAL, _CENTRAL = b"PK\x03\x04", b"PK\x01\x02"
_END, _END64, _LOCATOR64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_SENTINEL, _SENTINEL16 = 0xFFFFFFFF, 0xFFFF  # "see the ZIP64 record" in a 32 / 16-bit field
_ZIP64_SIZE, _ZIP64_COUNT = _SENTINEL, _SENTINEL16  # values from these on need ZIP64 records
_VERSION, _VERSION64 = 20, 45  # "version needed to extract": deflate, ZIP64
_UTF8 = 0x800  # general purpose flag bit 11: the name is UTF-8
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, as zipfile's default ZipInfo, so the bytes are repeatable
_PERMISSIONS = 0o100600 << 16  # a regular file, rw-------


@dataclass
class _Member:
    name: bytes
    flags: int
    method: int
    crc: int
    compressed: int
    size: int
    offset: int


class NpzWriter:
    """An ``.npz`` file written one array at a time, readable by ``numpy.load``.

    ``numpy.savez`` needs every array in memory at once; this streams each into the archive as
    it comes, so a run over many images holds one batch of heatmaps at a time. Use as a context
    manager (the file is complete when it closes); a key used twice raises ``ValueError``.

    Args:
        path: the file to create (parent folders are created).
        compress: deflate the arrays (smaller, slower), as ``numpy.savez_compressed``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "maps.npz"
        >>> with NpzWriter(path) as npz:
        ...     npz.add("a", np.arange(3, dtype=np.float32))
        >>> np.load(path)["a"]
        array([0., 1., 2.], dtype=float32)
    """

    def __init__(self, path: str | os.PathLike, compress: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.compress = compress
        self._file: BinaryIO = open(self.path, "wb")  # closed by close()
        self._members: list[_Member] = []
        self._keys: set[str] = set()

    def add(self, key: str, array: Tensor | np.ndarray) -> None:
        """Store ``array`` under ``key`` (``numpy.load(path)[key]`` gives it back)."""
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = np.array(array, order="C")
        if array.dtype.hasobject:
            raise ValueError(f"{key!r}: object arrays cannot be stored without pickling")
        parts = [_npy_header(array), array.reshape(-1).view(np.uint8)]
        size = sum(len(part) for part in parts)
        crc = 0
        for part in parts:
            crc = crc32(part, crc)
        if self.compress:
            compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
            parts = [b"".join([*(compressor.compress(part) for part in parts), compressor.flush()])]
        stored = sum(len(part) for part in parts)
        method = zipfile.ZIP_DEFLATED if self.compress else zipfile.ZIP_STORED
        self._claim(key)
        member = self._start(key, method, crc, stored, size)
        for part in parts:
            self._file.write(part)
        self._members.append(member)

    def copy(self, source: str | os.PathLike, keys: Mapping[str, str]) -> None:
        """Copy arrays of the ``.npz`` file ``source`` as they are stored (compressed or not,
        with their CRC), without decoding them: the kernel copies the bytes where it can
        (``copy_file_range``), else they pass through a 1 MiB buffer.

        Args:
            source: an ``.npz`` file (one written by this class, or by ``numpy.savez``).
            keys: key in ``source`` -> key here.

        Raises:
            KeyError: a key is not in ``source``.
        """
        with open(source, "rb") as file, zipfile.ZipFile(file) as archive:
            for old, new in keys.items():
                try:
                    info = archive.getinfo(old + ".npy")
                except KeyError:
                    raise KeyError(f"{source}: no array {old!r}") from None
                file.seek(info.header_offset)
                local = file.read(30)
                if local[:4] != _LOCAL:
                    raise ValueError(f"{source}: bad ZIP header of {old!r}")
                name_length, extra_length = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_length + extra_length
                self._claim(new)
                member = self._start(
                    new, info.compress_type, info.CRC, info.compress_size, info.file_size
                )
                self._file.flush()
                _copy_range(file, self._file, start, info.compress_size)
                self._members.append(member)

    @property
    def keys(self) -> frozenset[str]:
        """The keys written so far."""
        return frozenset(self._keys)

    def sync(self) -> None:
        """Put what is written so far on the disk (``fsync``), e.g. from a background thread,
        so that the ``fsync`` after :meth:`close` has little left to write."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Write the archive's central directory and close the file."""
        if self._file.closed:
            return
        try:
            self._write_directory()
        finally:
            self._file.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _claim(self, key: str) -> None:
        if key in self._keys:
            raise ValueError(f"duplicate NPZ key {key!r}")
        self._keys.add(key)

    def _start(self, key: str, method: int, crc: int, compressed: int, size: int) -> _Member:
        """Write the local header of a member whose data follows; returns its directory entry."""
        name, flags = _encode(key + ".npy")
        member = _Member(name, flags, method, crc, compressed, size, self._file.tell())
        big = max(compressed, size) >= _ZIP64_SIZE
        extra = struct.pack("<HHQQ", 1, 16, size, compressed) if big else b""
        self._file.write(
            _LOCAL
            + struct.pack(
                "<HHHHHIIIHH",
                _VERSION64 if big else _VERSION,
                flags,
                method,
                0,
                _DOS_DATE,
                crc,
                _SENTINEL if big else compressed,
                _SENTINEL if big else size,
                len(name),
                len(extra),
            )
            + name
            + extra
        )
        return member

    def _write_directory(self) -> None:
        start = self._file.tell()
        entries = []
        for m in self._members:
            wide = [v for v in (m.size, m.compressed, m.offset) if v >= _ZIP64_SIZE]
            extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
            version = _VERSION64 if wide else _VERSION
            entries.append(
                _CENTRAL
                + struct.pack(
                    "<BBHHHHHIIIHHHHHII",
                    version,
                    3,  # made by: version, Unix (the permissions below)
                    version,
                    m.flags,
                    m.method,
                    0,
                    _DOS_DATE,
                    m.crc,
                    _field(m.compressed),
                    _field(m.size),
                    len(m.name),
                    len(extra),
                    0,
                    0,
                    0,
                    _PERMISSIONS,
                    _field(m.offset),
                )
                + m.name
                + extra
            )
        directory = b"".join(entries)
        self._file.write(directory)
        count, length = len(self._members), len(directory)
        if count >= _ZIP64_COUNT or start >= _ZIP64_SIZE or length >= _ZIP64_SIZE:
            end64 = self._file.tell()
            self._file.write(
                _END64
                + struct.pack(
                    "<QHHIIQQQQ", 44, _VERSION64, _VERSION64, 0, 0, count, count, length, start
                )
                + _LOCATOR64
                + struct.pack("<IQI", 0, end64, 1)
            )
        short = _SENTINEL16 if count >= _ZIP64_COUNT else count
        self._file.write(
            _END + struct.pack("<HHHHIIH", 0, 0, short, short, _field(length), _field(start), 0)
        )


def _field(value: int) -> int:
    """A size or offset for a 32-bit field: itself, or the sentinel when ZIP64 holds it."""
    return _SENTINEL if value >= _ZIP64_SIZE else value


def _npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` header of a C-contiguous array (format 1.0; 2.0 for a header over 64 KiB)."""
    header = io.BytesIO()
    fields = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    return header.getvalue()


def crc32(data: bytes | memoryview | np.ndarray, value: int = 0) -> int:
    """``zlib.crc32(data, value)``, by ISA-L when it is installed (3.5x faster, same value)."""
    return (isal_zlib or zlib).crc32(data, value)


def _encode(name: str) -> tuple[bytes, int]:
    """A member name's bytes and flags: ASCII as it is, anything else UTF-8 with its flag."""
    try:
        return name.encode("ascii"), 0
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape"), _UTF8


def _copy_range(source: BinaryIO, target: BinaryIO, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``source`` from ``offset`` to ``target`` (flushed): in the
    kernel where the platform can (``copy_file_range``), else through a buffer."""
    copy_file_range = getattr(os, "copy_file_range", None)
    done = 0
    if copy_file_range is not None:
        try:
            while done < count:
                copied = copy_file_range(
                    source.fileno(), target.fileno(), count - done, offset + done
                )
                if copied == 0:
                    break
                done += copied
        except OSError:  # e.g. a file system that does not support it
            pass
    target.seek(0, os.SEEK_END)
    source.seek(offset + done)
    while done < count:
        chunk = source.read(min(1 << 20, count - done))
        if not chunk:
            raise ValueError(f"{source.name}: truncated ZIP member")
        target.write(chunk)
        done += len(chunk)
