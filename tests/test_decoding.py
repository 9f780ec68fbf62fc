"""``decoded_batches``: the explain job's decoding threads, against PIL decoding each file alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_explain import CORRUPT, INPUT, TRUNCATED

from cam_engine.io import ImageFolder, decoded_batches, find_images


def _pil_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("threads", [0, 2])
def test_batches_hold_every_image_in_order_and_set_bad_files_aside(image_dir, threads):
    paths = [p for p in find_images([image_dir]) if p.suffix == ".png"]
    paths += [image_dir / CORRUPT, image_dir / TRUNCATED]
    paths[1], paths[-1] = paths[-1], paths[1]  # a bad file inside the first batch too
    images = ImageFolder(paths, (INPUT, INPUT))
    batches = list(decoded_batches(images, 3, threads))

    assert [len(b.indices) + len(b.skipped) for b in batches] == [
        min(3, len(paths) - s) for s in range(0, len(paths), 3)
    ]
    decoded = [i for b in batches for i in b.indices]
    skipped = [i for b in batches for i, _ in b.skipped]
    assert sorted(decoded + skipped) == list(range(len(paths)))
    assert {paths[i].name for i in skipped} == {CORRUPT.split("/")[-1], TRUNCATED.split("/")[-1]}
    for batch in batches:
        assert batch.indices == sorted(batch.indices)
        assert batch.inputs.shape == (len(batch.indices), 3, INPUT, INPUT)
        for i, original in zip(batch.indices, batch.originals, strict=True):
            # PNG is lossless: torchvision's decoder and PIL give the same pixels
            np.testing.assert_array_equal(original.permute(1, 2, 0).numpy(), _pil_rgb(paths[i]))
            torch.testing.assert_close(batch.inputs[batch.indices.index(i)], images[i].input)


class _Counting(ImageFolder):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.decoded: list[int] = []

    def __getitem__(self, index: int):
        self.decoded.append(index)
        return super().__getitem__(index)


def _decoding_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cam-engine-decode")]


def test_threads_decode_a_bounded_number_ahead_and_stop_when_the_consumer_does(image_dir):
    paths = [p for p in find_images([image_dir]) if p.suffix == ".png"] * 10
    images = _Counting(paths, (INPUT, INPUT))
    batches = decoded_batches(images, 2, 2)
    first = next(batches)
    assert first.indices == [0, 1]
    assert len(images.decoded) <= 3 * 2  # the batch taken and two ahead, not the whole folder
    batches.close()
    assert not _decoding_threads()
    assert len(images.decoded) <= 3 * 2


def test_bad_arguments_are_refused(image_dir):
    images = ImageFolder([], (INPUT, INPUT))
    with pytest.raises(ValueError, match="batch_size >= 1"):
        next(decoded_batches(images, 0, 1))
    with pytest.raises(ValueError, match="threads >= 0"):
        next(decoded_batches(images, 1, -1))
    assert list(decoded_batches(images, 4, 2)) == []
