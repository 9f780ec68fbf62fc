"""A synthetic shapes data set with object masks, generated in batches by pure torch.

Four classes (circle, square, triangle, cross) drawn with anti-aliased edges, random position,
scale, rotation and colour, on textured noisy backgrounds: a smooth colour field, a grating of
random frequency and orientation, and pixel noise. The object is always brighter or darker than
its background, so the label is decidable, but only by the object's outline.

Two splits:

- :func:`single`: one object per image, anywhere, of any size;
- :func:`multi`: two or three objects of different classes per image, one per cell of a 2 x 2
  grid (so they never overlap), smaller.

Every batch comes from its own seeded ``torch.Generator``: the same ``seed`` gives the same images
on every machine, and no global random state is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLASSES", "ShapesBatch", "single", "multi"]

CLASSES = ("circle", "square", "triangle", "cross")


@dataclass
class ShapesBatch:
    """Images with the class and the mask of every object.

    Attributes:
        images: (B, 3, H, W) float32 in [0, 1].
        labels: (B, K) long class ids of the K object slots; -1 marks an empty slot.
        masks: (B, K, H, W) bool, the pixels of each object (all False for an empty slot).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor

    @property
    def valid(self) -> Tensor:
        """(B, K) bool: the slots that hold an object."""
        return self.labels >= 0


def _signed_distance(kind: Tensor, u: Tensor, v: Tensor, radius: Tensor) -> Tensor:
    """Approximate signed distance (pixels, negative inside) to each object's outline.

    Args:
        kind: (B, K) class ids (index into :data:`CLASSES`).
        u, v: (B, K, H, W) pixel coordinates in each object's rotated frame (v points down).
        radius: (B, K, 1, 1) object size in pixels; every shape spans about ``2 * radius``.
    """
    au, av = u.abs(), v.abs()
    circle = torch.sqrt(u**2 + v**2) - radius
    square = torch.maximum(au, av) - 0.8 * radius
    # equilateral triangle, apex up: circumradius 1.15 r, edge normals at 90, 210 and 330 degrees
    normals = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    edges = torch.stack([u * cu + v * cv for cu, cv in normals])
    triangle = edges.amax(dim=0) - 0.575 * radius
    arm, half_width = radius, 0.33 * radius
    cross = torch.minimum(
        torch.maximum(au - arm, av - half_width), torch.maximum(av - arm, au - half_width)
    )
    distances = torch.stack([circle, square, triangle, cross], dim=2)  # (B, K, 4, H, W)
    index = kind.clamp(min=0)[:, :, None, None, None].expand(-1, -1, 1, *u.shape[2:])
    return distances.gather(2, index).squeeze(2)


def _background(batch: int, size: int, level: Tensor, gen: torch.Generator) -> Tensor:
    """(B, 3, H, W) textured noisy backgrounds around a mean grey ``level`` (B,)."""
    tint = (torch.rand(batch, 3, 1, 1, generator=gen) - 0.5) * 0.3
    blotches = F.interpolate(
        torch.randn(batch, 3, 4, 4, generator=gen) * 0.08,
        size=(size, size),
        mode="bicubic",
        align_corners=False,
    )
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    angle = torch.rand(batch, 1, 1, generator=gen) * math.pi
    frequency = (2 + torch.rand(batch, 1, 1, generator=gen) * 8) * 2 * math.pi / size
    phase = torch.rand(batch, 1, 1, generator=gen) * 2 * math.pi
    amplitude = torch.rand(batch, 1, 1, generator=gen) * 0.12
    grating = amplitude * torch.sin(
        frequency * (xs * torch.cos(angle) + ys * torch.sin(angle)) + phase
    )
    return level[:, None, None, None] + tint + blotches + grating[:, None]


def _colours(level: Tensor, gen: torch.Generator) -> Tensor:
    """(B, K, 3) object colours whose mean is 0.25 to 0.45 away from the background ``level``."""
    batch, slots = level.shape[0], 3
    contrast = 0.25 + torch.rand(batch, slots, generator=gen) * 0.2
    # darker than the background when a brighter colour would not fit below 1, else random
    darker = torch.rand(batch, slots, generator=gen) < 0.5
    darker = torch.where(level[:, None] + contrast > 0.95, True, darker)
    darker = torch.where(level[:, None] - contrast < 0.05, False, darker)
    target = level[:, None] + torch.where(darker, -contrast, contrast)
    hue = torch.rand(batch, slots, 3, generator=gen)
    return hue - hue.mean(dim=2, keepdim=True) + target[..., None]


def _render(
    kind: Tensor, centre: Tensor, radius: Tensor, size: int, gen: torch.Generator
) -> ShapesBatch:
    """Draw objects (B, K) of classes ``kind`` (-1: none) at ``centre`` (B, K, 2) xy pixels."""
    batch, slots = kind.shape
    level = 0.2 + torch.rand(batch, generator=gen) * 0.6
    image = _background(batch, size, level, gen)
    colours = _colours(level, gen)[:, :slots]
    angle = torch.rand(batch, slots, 1, 1, generator=gen) * 2 * math.pi
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, None, :] - centre[..., 0, None, None]
    dy = coords[None, None, :, None] - centre[..., 1, None, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    distance = _signed_distance(kind, u, v, radius[..., None, None])
    # one-pixel-wide linear ramp at the outline: anti-aliased edges
    coverage = (0.5 - distance).clamp(0, 1) * (kind >= 0)[..., None, None]
    texture = 1 + 0.08 * torch.randn(batch, slots, 1, size, size, generator=gen)
    for k in range(slots):
        alpha = coverage[:, k, None]
        image = image * (1 - alpha) + colours[:, k, :, None, None] * texture[:, k] * alpha
    noise = torch.rand(batch, 1, 1, 1, generator=gen) * 0.08
    image = image + noise * torch.randn(image.shape, generator=gen)
    return ShapesBatch(image.clamp(0, 1), kind, coverage > 0.5)


def single(batch: int, size: int = 64, seed: int = 0) -> ShapesBatch:
    """One object per image, radius 12 % to 30 % of the image, anywhere it fits.

    Returns:
        :class:`ShapesBatch` with K = 1: images (B, 3, size, size), labels (B, 1), masks
        (B, 1, size, size).
    """
    gen = torch.Generator().manual_seed(seed)
    kind = torch.randint(len(CLASSES), (batch, 1), generator=gen)
    radius = size * (0.12 + torch.rand(batch, 1, generator=gen) * 0.18)
    margin = 1.2 * radius[..., None]  # the farthest any shape reaches from its centre
    centre = margin + torch.rand(batch, 1, 2, generator=gen) * (size - 2 * margin)
    return _render(kind, centre, radius, size, gen)


def multi(batch: int, size: int = 64, seed: int = 0) -> ShapesBatch:
    """Two or three objects of different classes per image, each in its own image quadrant.

    Returns:
        :class:`ShapesBatch` with K = 3 slots (label -1 and an empty mask where an image has
        only two objects): images (B, 3, size, size), labels (B, 3), masks (B, 3, size, size).
    """
    gen = torch.Generator().manual_seed(seed)
    kind = torch.rand(batch, len(CLASSES), generator=gen).argsort(dim=1)[:, :3]
    two = torch.rand(batch, generator=gen) < 0.5
    kind[:, 2] = torch.where(two, -1, kind[:, 2])
    cell = torch.rand(batch, 4, generator=gen).argsort(dim=1)[:, :3]
    corner = torch.stack([cell % 2, cell // 2], dim=2) * (size / 2)  # (B, 3, 2) xy
    radius = size * (0.11 + torch.rand(batch, 3, generator=gen) * 0.06)
    margin = 1.2 * radius[..., None]
    centre = corner + margin + torch.rand(batch, 3, 2, generator=gen) * (size / 2 - 2 * margin)
    return _render(kind, centre, radius, size, gen)
