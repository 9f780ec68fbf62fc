"""Images in, pictures and arrays out: the file edges of the library.

Reading: :func:`find_images` lists the JPEG / PNG files of files and folders, :class:`ImageFolder`
decodes them (torchvision's decoders) into the original uint8 image and the model input resized to
a fixed size, :func:`collate` batches them, setting unreadable files aside instead of failing the
batch, and :func:`decoded_batches` runs both on threads ahead of the model. :func:`image_size` reads
a file's size from its header, so that an image too large to decode (a decompression bomb) is set
aside before it is decoded.
Writing: :func:`save_png` (:func:`png_bytes`; :func:`rgb_rows`, a tensor's pixel rows),
:class:`NpzWriter` (one ``.npz`` written array by array, from :mod:`cam_engine.npz`) and
:func:`contact_sheet` (a titled grid of tiles; :func:`contact_sheet_rows`, its pixels).
"""

from __future__ import annotations

import os
import re
import struct
import unicodedata
import warnings
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from .arguments import MAX_PIXELS
from .npz import NpzWriter, crc32

try:  # ISA-L's deflate: 6x faster than zlib's fastest level, for files of the same size
    from isal import isal_zlib
except ImportError:  # a platform without its wheel: zlib
    isal_zlib = None

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "find_images",
    "image_keys",
    "image_size",
    "reason",
    "ImageFolder",
    "Sample",
    "Batch",
    "collate",
    "decoded_batches",
    "save_png",
    "png_bytes",
    "rgb_rows",
    "deflate",
    "NpzWriter",
    "contact_sheet",
    "contact_sheet_rows",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_images(
    sources: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = ()
) -> list[Path]:
    """The JPEG / PNG files named by ``sources``, each once, in a deterministic order.

    A file is taken as given (whatever its suffix: the user named it); a folder is searched
    recursively for ``.jpg``, ``.jpeg`` and ``.png`` files (any case; hidden entries skipped).
    Files in the folders ``exclude`` (an output folder among the inputs) are left out.

    Returns:
        Paths in the order of ``sources``, each folder's files sorted by path.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: no image was found.
    """
    sources = [Path(s) for s in sources]
    excluded = [Path(folder).resolve() for folder in exclude]
    found: dict[Path, Path] = {}  # resolved -> as found: one entry per file however it is named
    for source in sources:
        if source.is_dir():
            files = (
                p
                for p in source.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(source).parts)
            )
            for path in sorted(files):
                found.setdefault(path.resolve(), path)
        elif source.exists():
            found.setdefault(source.resolve(), source)
        else:
            raise FileNotFoundError(f"no such file or folder: {source}")
    for resolved in [r for r in found if any(e in r.parents for e in excluded)]:
        del found[resolved]
    if not found:
        raise ValueError(f"no .jpg / .jpeg / .png images found in {', '.join(map(str, sources))}")
    return list(found.values())


def image_keys(paths: Sequence[Path]) -> list[str]:
    """Short unique names of images: their paths relative to the folder all of them share.

    ``["data/a/1.jpg", "data/b/1.jpg"]`` -> ``["a/1.jpg", "b/1.jpg"]``; always with ``/``.
    Used to name output files and NPZ entries.
    """
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(root).as_posix() for p in resolved]


def reason(exc: Exception) -> str:
    """Why an image failed, in one line of valid UTF-8 (a file name in the message may not be),
    without the C++ source location torchvision prepends."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _CPP_LOCATION.sub("", message).encode("utf-8", "backslashreplace").decode("utf-8")


_CPP_LOCATION = re.compile(r"^[^,]+, \S+\.cpp:\d+, ")
#: JPEG frame headers (SOF0-SOF15 but DHT, JPG and DAC), which hold the image size
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) of an image from its file's header, without decoding it.

    Reads the formats that :func:`torchvision.io.decode_image` decodes: PNG, JPEG, GIF (the
    canvas) and WebP. ``None`` for any other file, or one whose header is cut short.
    """
    return _probe(path)[1]


def _probe(path: str | os.PathLike) -> tuple[str | None, tuple[int, int] | None]:
    """(format, (H, W)): format ``None`` when unknown, size ``None`` when unreadable."""
    with open(path, "rb") as file:
        head = file.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            found = None
            if len(head) >= 24 and head[12:16] == b"IHDR":
                found = struct.unpack(">II", head[16:24])
            return "png", found and (found[1], found[0])
        if head[:6] in (b"GIF87a", b"GIF89a"):
            found = struct.unpack("<HH", head[6:10]) if len(head) >= 10 else None
            return "gif", found and (found[1], found[0])
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return "webp", _webp_size(head)
        if head[:2] == b"\xff\xd8":
            file.seek(2)
            return "jpeg", _jpeg_size(file)
    return None, None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """(H, W) from the first chunk of a WebP file: lossy, lossless or extended."""
    kind = head[12:16]
    if kind == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return height & 0x3FFF, width & 0x3FFF  # the top 2 bits are a scaling hint
    if kind == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[27:30], "little") + 1, int.from_bytes(head[24:27], "little") + 1
    return None


def _jpeg_size(file) -> tuple[int, int] | None:
    """(H, W) from the frame header of a JPEG file, read segment by segment after the SOI."""
    while True:
        byte = file.read(1)
        while byte and byte != b"\xff":  # stray bytes between segments: libjpeg skips them too
            byte = file.read(1)
        marker = file.read(1)
        while marker == b"\xff":  # fill bytes
            marker = file.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # the end, or image data: no frame header
            return None
        if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # markers without a segment
            continue
        segment = file.read(7)  # length (2 bytes, itself included), then a frame's P, Y, X
        length = struct.unpack(">H", segment[:2])[0] if len(segment) >= 2 else 0
        if length < 2:
            return None
        if marker[0] in _JPEG_FRAMES:
            return struct.unpack(">HH", segment[3:7]) if len(segment) == 7 else None
        file.seek(length - len(segment), os.SEEK_CUR)


@dataclass
class Sample:
    """One decoded image (or the reason it could not be decoded).

    Attributes:
        index: position in the dataset.
        original: (3, H, W) uint8 RGB at the file's size, or ``None``.
        input: (3, S_h, S_w) uint8 RGB resized to the model's input size, or ``None``.
        error: why the file could not be read, or ``None``.
    """

    index: int
    original: Tensor | None = None
    input: Tensor | None = None
    error: str | None = None


class ImageFolder(Dataset):
    """Images decoded to RGB (grey, RGBA and palette files too), original and resized.

    The model input is the whole image resized to ``size`` (bilinear with antialiasing, aspect not
    kept, no crop), so a heatmap covers every pixel once upsampled back to the original size. It
    stays uint8 here: the batch is normalised on the model's device (4x less to copy).

    A file is decoded only if its header gives a size of at most ``max_pixels``; an animated GIF
    gives its first frame (decoded alone: its other frames could be a bomb of their own).

    Args:
        paths: image files (see :func:`find_images`).
        size: (H, W) of the model input.
        max_pixels: larger images are set aside undecoded, with the reason.
    """

    def __init__(
        self, paths: Sequence[Path], size: tuple[int, int], max_pixels: int = MAX_PIXELS
    ) -> None:
        self.paths = list(paths)
        self.size = [int(s) for s in size]
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        path = self.paths[index]
        try:
            kind, size = _probe(path)
            if kind is None:
                return Sample(index, error="not a PNG, JPEG, GIF or WebP file")
            if size is None or min(size) < 1:
                return Sample(index, error=f"damaged {kind.upper()} file: no image size")
            height, width = size
            if height * width > self.max_pixels:
                return Sample(
                    index,
                    error=f"{width}x{height} = {width * height} pixels, over the limit of "
                    f"{self.max_pixels} (--max-pixels)",
                )
            if kind == "gif":
                image = _first_frame(path)
            else:  # read here: torchvision cannot open a file name that is not UTF-8
                data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
                image = decode_image(data, mode=ImageReadMode.RGB)
        except Exception as exc:  # corrupt, truncated or unsupported: reported, never fatal
            return Sample(index, error=reason(exc))
        if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
            image = TF.to_dtype(image, torch.uint8, scale=True)
        resized = TF.resize(image, self.size, antialias=True)
        return Sample(index, image, resized)


def _first_frame(path: Path) -> Tensor:
    """The first frame of a GIF, (3, H, W) uint8 RGB (torchvision would decode every frame)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked: max_pixels
        with Image.open(path) as gif:
            return torch.from_numpy(np.array(gif.convert("RGB"))).permute(2, 0, 1).contiguous()


@dataclass
class Batch:
    """Samples collated by :func:`collate`.

    Attributes:
        indices: dataset positions of the decoded images, length B.
        originals: B uint8 tensors (3, H_i, W_i), sizes may differ.
        inputs: (B, 3, S_h, S_w) uint8, or ``None`` when every image failed.
        skipped: (dataset position, reason) of the images that could not be decoded.
    """

    indices: list[int] = field(default_factory=list)
    originals: list[Tensor] = field(default_factory=list)
    inputs: Tensor | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """The batch with its inputs in page-locked memory (DataLoader ``pin_memory=True``)."""
        if self.inputs is not None:
            self.inputs = self.inputs.pin_memory()
        return self


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the decoded samples' inputs, keep their originals as a list, set failures aside."""
    batch = Batch()
    for sample in samples:
        if sample.error is not None:
            batch.skipped.append((sample.index, sample.error))
        else:
            batch.indices.append(sample.index)
            batch.originals.append(sample.original)
    good = [s.input for s in samples if s.error is None]
    batch.inputs = torch.stack(good) if good else None
    return batch


def decoded_batches(
    images: ImageFolder, batch_size: int, threads: int, *, pin_memory: bool = False
) -> Iterator[Batch]:
    """The images of ``images`` decoded and collated ``batch_size`` at a time, in order.

    ``threads`` threads decode up to two batches ahead of the consumer. Threads, not processes:
    the decoders and the resize release the GIL (and run no torch threads of their own on one
    image), so they run beside the model at no cost of process start, copy-on-write of the
    parent's memory or pixels sent between processes (measured: 4.5 CPU ms per 640 x 480 JPEG
    decoded in this process, 10 with two DataLoader worker processes).

    Args:
        images: the images.
        batch_size: images per batch (the last batch may hold fewer).
        threads: decoding threads; 0 decodes in the calling thread, when a batch is asked for.
        pin_memory: put each batch's inputs in page-locked memory (for a CUDA model).

    Yields:
        :class:`Batch` of images ``[i, i + batch_size)``, i = 0, batch_size, ...
    """
    if batch_size < 1 or threads < 0:
        raise ValueError(f"need batch_size >= 1 and threads >= 0, got {batch_size}, {threads}")
    starts = range(0, len(images), batch_size)
    if threads == 0:
        for start in starts:
            batch = collate([images[i] for i in range(start, min(start + batch_size, len(images)))])
            yield batch.pin_memory() if pin_memory else batch
        return
    pool = ThreadPoolExecutor(threads, "cam-engine-decode")
    pending: deque[Future[Sample]] = deque()
    order = iter(range(len(images)))
    try:
        for start in starts:
            # the batch asked for and the next two are decoding or decoded
            while len(pending) < 3 * batch_size and (index := next(order, None)) is not None:
                pending.append(pool.submit(images.__getitem__, index))
            size = min(batch_size, len(images) - start)
            batch = collate([pending.popleft().result() for _ in range(size)])
            yield batch.pin_memory() if pin_memory else batch
    finally:  # also when the consumer stops early: what was not started is dropped
        pool.shutdown(wait=True, cancel_futures=True)


def rgb_rows(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) uint8 RGB images -> their (N, H, W, 3) uint8 NumPy rows, on the CPU: a view
    of channels-last images (as decoders and :func:`cam_engine.overlay` give them), else a copy
    made a plane at a time (5x faster than one transposing copy)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    planes = images.detach().cpu().numpy()
    rows = planes.transpose(0, 2, 3, 1)
    if rows.flags.c_contiguous:
        return rows
    rows = np.empty(rows.shape, np.uint8)
    for c in range(3):
        rows[..., c] = planes[:, c]
    return rows


def _to_hwc(image: Tensor) -> np.ndarray:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a uint8 RGB image (3, H, W), got {image.dtype} {tuple(image.shape)}"
        )
    return rgb_rows(image[None])[0]


def save_png(
    path: str | os.PathLike, image: Tensor | np.ndarray | Image.Image, compress_level: int = 1
) -> None:
    """Write a picture as a PNG, creating parent folders: a uint8 (3, H, W) RGB tensor, uint8
    (H, W, 3) RGB rows as a NumPy array, or a PIL image.

    RGB pictures are encoded by :func:`png_bytes`; a PIL image of another mode by PIL.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, Image.Image) and image.mode != "RGB":
        image.save(path, format="PNG", compress_level=compress_level)
        return
    pixels = _to_hwc(image) if isinstance(image, Tensor) else np.asarray(image)
    path.write_bytes(png_bytes(pixels, compress_level))


def png_bytes(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """The PNG file of an (H, W, 3) uint8 RGB array.

    Every row is filtered with PNG's "Sub" filter (each byte minus the one a pixel to its left)
    and deflated by :func:`deflate` at ``compress_level``. On 640 x 480 overlays of noisy photos
    the filter with zlib's run-length strategy is 2x faster than PIL at its fastest (level 1,
    whose adaptive filter tries five filters per row), for files of the same size within 1%;
    ISA-L's level 1 is 6x faster again (2.2 against 13.2 CPU ms), for the same size. NumPy, zlib
    and ISA-L release the GIL, so threads encode in parallel.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB pixels, got {pixels.dtype} {pixels.shape}")
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 1  # the filter type of each row: Sub
    filtered[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])  # modulo 256, as PNG defines
    data = deflate(filtered, compress_level)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join(
        [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), _chunk(b"IDAT", data), _chunk(b"IEND", b"")]
    )


def deflate(data: np.ndarray | bytes, level: int = 1) -> bytes:
    """``data`` as a zlib stream: stored at level 0; else ISA-L's deflate at ``min(level, 3)``
    (its levels are 0-3) when the ``isal`` package is installed, zlib's run-length strategy
    (``Z_RLE``) at ``level`` when not."""
    if not 0 <= level <= 9:
        raise ValueError(f"compress_level must be in [0, 9], got {level}")
    if level and isal_zlib is not None:
        return isal_zlib.compress(data, min(level, 3))
    compressor = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return compressor.compress(data) + compressor.flush()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = crc32(data, crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _font(tile_width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(10, min(24, tile_width // 14))
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` on one line (control characters and undecodable bytes as ``?``), cut and ended
    with an ellipsis if it is wider than ``width`` pixels."""
    text = "".join("?" if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def probability_text(p: float) -> str:
    """A probability for a title, to 3 significant digits: ``0.00123``, ``0.870``, ``1.00``."""
    return f"{p:#.3g}"


def contact_sheet(
    tiles: Tensor | np.ndarray, titles: Sequence[Sequence[str]] | None = None, pad: int = 4
) -> Image.Image:
    """A grid of images with a title line above each, on a white background.

    Args:
        tiles: (R, C, 3, H, W) uint8 RGB: R rows of C images (e.g. an input and its overlays);
            or a NumPy array of the same tiles channels-last, (R, C, H, W, 3) uint8, which
            needs no torch (a thread pool drawing sheets then leaves torch's threads alone).
        titles: R rows of C strings (``""`` for none), or ``None`` for no title lines. Titles
            wider than their tile are shortened with an ellipsis; control characters and
            undecodable bytes of file names show as ``?``.
        pad: pixels between tiles and around the grid.

    Returns:
        An RGB ``PIL.Image`` of width ``C * (W + pad) + pad``: :func:`contact_sheet_rows`.
    """
    return Image.fromarray(contact_sheet_rows(tiles, titles, pad))


def contact_sheet_rows(
    tiles: Tensor | np.ndarray, titles: Sequence[Sequence[str]] | None = None, pad: int = 4
) -> np.ndarray:
    """The pixels of :func:`contact_sheet`, (height, width, 3) uint8 RGB rows: drawn in NumPy
    (the titles with PIL, each on its own strip), for :func:`save_png` without a copy."""
    if isinstance(tiles, np.ndarray):
        if tiles.ndim != 5 or tiles.shape[4] != 3 or tiles.dtype != np.uint8:
            raise ValueError(
                f"tile arrays must be uint8 (R, C, H, W, 3), got {tiles.dtype} {tiles.shape}"
            )
        pixels = tiles
    elif tiles.ndim != 5 or tiles.shape[2] != 3 or tiles.dtype != torch.uint8:
        raise ValueError(
            f"tiles must be uint8 (R, C, 3, H, W), got {tiles.dtype} {tuple(tiles.shape)}"
        )
    else:
        pixels = tiles.detach().cpu().permute(0, 1, 3, 4, 2).numpy()
    rows, cols, height, width, _ = pixels.shape
    if titles is not None and (len(titles) != rows or any(len(row) != cols for row in titles)):
        raise ValueError(f"titles must be {rows} rows of {cols} strings")
    font = _font(width)
    line = font.getbbox("Ag|")[3] + pad if titles is not None else 0
    cell_h, cell_w = line + height + pad, width + pad
    sheet = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            x, y = pad + c * cell_w, pad + r * cell_h
            if titles is not None:
                strip = Image.new("RGB", (width, line), "white")
                draw = ImageDraw.Draw(strip)
                draw.text((0, 0), _fit(draw, str(titles[r][c]), font, width), "black", font)
                sheet[y : y + line, x : x + width] = np.asarray(strip)
            sheet[y + line : y + line + height, x : x + width] = pixels[r, c]
    return sheet
