"""The demo classifier: a small global-average-pool CNN for the shapes data set, and its training.

``ShapesNet`` is the classic CAM architecture (Zhou et al. 2016) in miniature: a conv trunk ending
in a (B, 64, 16, 16) feature map for 64 x 64 images, global average pooling, one ``Linear``. CAM
and Grad-CAM are therefore closed form on it, and its 16 x 16 maps are fine enough to point at
objects a few pixels wide. Its trained weights ship with the package (``shapes_net.pt``, about
300 kB); :func:`train` reproduces them from scratch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import shapes

__all__ = ["ShapesNet", "CHECKPOINT", "pretrained", "train", "accuracy"]

CHECKPOINT = "shapes_net.pt"
IMAGE_SIZE = 64


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ShapesNet(nn.Module):
    """Conv trunk -> ``AdaptiveAvgPool2d(1)`` -> ``Linear(64, 4)``; the CAM target is ``features``.

    Input (B, 3, H, W) in [0, 1] (any H, W divisible by 4); ``features`` gives (B, 64, H/4, W/4).
    """

    def __init__(self, num_classes: int = len(shapes.CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, 16),
            *_block(16, 16),
            nn.MaxPool2d(2),
            *_block(16, 32),
            *_block(32, 32),
            nn.MaxPool2d(2),
            *_block(32, 64),
            *_block(64, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 4) of images ``x`` (B, 3, H, W)."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def pretrained(path: str | Path | None = None) -> ShapesNet:
    """The shipped (or the given) checkpoint loaded into a :class:`ShapesNet` in eval mode."""
    source = Path(path) if path is not None else resources.files(__package__) / CHECKPOINT
    with source.open("rb") as file:
        state = torch.load(file, map_location="cpu", weights_only=True)
    model = ShapesNet()
    model.load_state_dict(state)
    return model.eval()


def _multi_hot(labels: torch.Tensor) -> torch.Tensor:
    """(B, 4) float targets from (B, K) class ids with -1 for empty slots."""
    hot = torch.zeros(len(labels), len(shapes.CLASSES) + 1)
    hot.scatter_(1, labels.where(labels >= 0, len(shapes.CLASSES)), 1.0)
    return hot[:, :-1]


def _mixed_batch(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, 64, 64), half with one object, half with several; labels (B, 3), -1 padded."""
    one = shapes.single(batch // 2, IMAGE_SIZE, seed)
    many = shapes.multi(batch - batch // 2, IMAGE_SIZE, seed)
    labels = torch.cat([F.pad(one.labels, (0, 2), value=-1), many.labels])
    return torch.cat([one.images, many.images]), labels


def train(
    steps: int = 1000, batch: int = 64, seed: int = 0, lr: float = 4e-3, progress: bool = True
) -> ShapesNet:
    """Train a :class:`ShapesNet` from scratch on freshly rendered batches.

    Each batch is half single-object, half multi-object images, with one independent sigmoid per
    class (multi-label binary cross-entropy): a softmax over single objects would also learn
    "no other shape here" as evidence, and each class's map would then point at the other
    objects too. Deterministic for a given ``seed`` on a given machine (batch ``i`` is rendered
    with seed ``seed * 1_000_003 + i``; the held-out splits of the demo and the tests use seeds
    far from these). AdamW with a one-cycle schedule; the progress bar shows the running
    fraction of images whose every class is right.
    """
    torch.manual_seed(seed)
    model = ShapesNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    model.train()
    running = 0.25
    bar = tqdm(range(steps), desc="train ShapesNet", disable=not progress)
    for step in bar:
        images, labels = _mixed_batch(batch, seed * 1_000_003 + step)
        logits = model(images)
        targets = _multi_hot(labels)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        hit = ((logits > 0) == targets.bool()).all(1).float().mean().item()
        running = 0.95 * running + 0.05 * hit
        bar.set_postfix(loss=f"{loss.item():.3f}", exact=f"{running:.2f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: shapes.ShapesBatch) -> float:
    """Top-1 accuracy of ``model`` on a single-object batch."""
    return (model(data.images).argmax(1) == data.labels[:, 0]).float().mean().item()
