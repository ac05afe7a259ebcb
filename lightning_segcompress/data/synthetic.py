"""Procedurally generated textured scenes: a small segmentation task that needs no download.

Colour carries no class information: the background and every object get random colours from the
same distribution. Each object class has a fixed texture (derived from the class id only), which
is what a network has to learn; shapes are only a weak cue. The background is a smooth noise field.
Every texture is invariant under horizontal flips (diagonal stripes are drawn at 45 or 135 degrees
at random), so flip augmentation keeps labels valid. Rescaling changes texture periods, so keep
``scale_range=(1.0, 1.0)`` unless ``num_classes`` is small enough that no two classes differ only
by period (<= 8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset

from .base import SeededItems, SegmentationDataModule, check_positive
from .transforms import SegmentationTransform

_KINDS = ("hstripes", "vstripes", "checker", "dots", "dstripes", "grid", "diamond")
# Class k (1-based) uses TEXTURES[k - 1]. Period 4 is only used where the pattern stays legible.
TEXTURES: tuple[tuple[str, int], ...] = tuple(
    (kind, period)
    for period in (8, 4, 12)
    for kind in _KINDS
    if period != 4 or kind in ("hstripes", "vstripes", "checker", "dstripes")
)
MAX_CLASSES = len(TEXTURES) + 1
_SHAPES = ("ellipse", "rectangle", "polygon")
def _rand(g: torch.Generator, low: float = 0.0, high: float = 1.0, shape: tuple = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _color_pair(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Each channel of the second colour is >= 0.25 away (circularly) from the first, so the texture stays
    # visible, while both colours are still uniformly distributed.
    first = torch.rand(3, generator=g)
    second = (first + _rand(g, 0.25, 0.75, (3,))) % 1.0
    return first.view(3, 1, 1), second.view(3, 1, 1)


def _texture(kind: str, period: int, yy: torch.Tensor, xx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Boolean two-tone pattern over the whole image, with a random phase."""
    oy, ox = (_rand(g, 0, period, (2,))).tolist()
    y, x = (yy + oy) / period, (xx + ox) / period
    if kind == "hstripes":
        return y % 1.0 < 0.5
    if kind == "vstripes":
        return x % 1.0 < 0.5
    if kind == "dstripes":
        sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
        return ((x + sign * y) / math.sqrt(2)) % 1.0 < 0.5
    if kind == "checker":
        return ((2 * y).floor() + (2 * x).floor()) % 2 == 0
    if kind == "diamond":
        u, v = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)
        return ((2 * u).floor() + (2 * v).floor()) % 2 == 0
    if kind == "dots":
        return (y % 1.0 - 0.5) ** 2 + (x % 1.0 - 0.5) ** 2 < 0.3**2
    if kind == "grid":
        return (y % 1.0 < 0.25) | (x % 1.0 < 0.25)
    raise ValueError(f"unknown texture kind {kind!r}")


def _shape(
    shape: str, yy: torch.Tensor, xx: torch.Tensor, g: torch.Generator, height: int, width: int
) -> torch.Tensor:
    """Boolean mask of a randomly placed, sized and rotated shape."""
    side = min(height, width)
    cy, cx = _rand(g, 0, height).item(), _rand(g, 0, width).item()
    a = _rand(g, 0.14, 0.36).item() * side
    b = a * _rand(g, 0.65, 1.0).item()
    angle = _rand(g, 0, math.pi).item()
    cos, sin = math.cos(angle), math.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = (dx * cos + dy * sin) / a, (dy * cos - dx * sin) / b
    if shape == "ellipse":
        return u * u + v * v <= 1
    if shape == "rectangle":
        return (u.abs() <= 0.85) & (v.abs() <= 0.85)
    sides = 3 if torch.rand((), generator=g) < 0.5 else 5
    normals = torch.arange(sides) * (2 * math.pi / sides)
    reach = u[None] * normals.cos().view(-1, 1, 1) + v[None] * normals.sin().view(-1, 1, 1)
    return reach.amax(0) <= math.cos(math.pi / sides)


def render_scene(
    g: torch.Generator, num_classes: int, image_size: tuple[int, int], max_objects: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders one scene: a float 3xHxW image in [0, 1] and an int64 HxW mask (0 = background)."""
    height, width = image_size
    yy = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    xx = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)

    field = nnf.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=image_size, mode="bicubic")[0]
    field = (field - field.min()) / (field.max() - field.min() + 1e-6)
    low, high = _color_pair(g)
    image = low + (high - low) * field
    mask = torch.zeros(image_size, dtype=torch.long)

    count = int(torch.randint(max(1, (2 * max_objects) // 3), max_objects + 1, (), generator=g))
    classes = torch.randint(1, num_classes, (count,), generator=g).tolist()
    for cls in classes:
        # Weak shape cue: each class prefers one shape for about 2/3 of its instances.
        if torch.rand((), generator=g) < 0.5:
            shape = _SHAPES[cls % len(_SHAPES)]
        else:
            shape = _SHAPES[int(torch.randint(len(_SHAPES), (), generator=g))]
        inside = _shape(shape, yy, xx, g, height, width)
        kind, period = TEXTURES[cls - 1]
        pattern = _texture(kind, period, yy, xx, g)
        first, second = _color_pair(g)
        image = torch.where(inside, torch.where(pattern, first, second), image)
        mask[inside] = cls

    contrast, brightness = _rand(g, 0.7, 1.2).item(), _rand(g, -0.15, 0.15).item()
    image = (image - 0.5) * contrast + 0.5 + brightness
    image = image + 0.04 * torch.randn(image.shape, generator=g)
    return image.clamp_(0, 1), mask


class SyntheticScenesDataset(SeededItems):
    """``length`` scenes of one split; item ``i`` depends only on ``(seed, split, i)``.

    Args:
        split: "train", "val" or "test".
        length: Number of items.
        num_classes: Number of classes including background (class 0).
        image_size: ``(height, width)`` of the rendered scenes.
        max_objects: Maximum number of objects per scene (at least two thirds of it are drawn).
        seed: Base seed of the data set.
        transform: Joint transform applied to ``(image, mask)``; ``None`` returns the raw [0, 1] image.
    """

    def __init__(
        self,
        split: str,
        length: int,
        num_classes: int = 6,
        image_size: tuple[int, int] = (128, 128),
        max_objects: int = 6,
        seed: int = 0,
        transform: SegmentationTransform | None = None,
    ) -> None:
        super().__init__(split, length, seed, transform)
        self.num_classes, self.image_size, self.max_objects = num_classes, tuple(image_size), max_objects

    def render(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return render_scene(g, self.num_classes, self.image_size, self.max_objects)


class SyntheticScenesDataModule(SegmentationDataModule):
    """Synthetic textured scenes, generated on the fly (no download). Predict uses the test split.

    Args:
        num_classes: Number of classes including background (class 0); 2 to ``MAX_CLASSES`` (19).
        image_size: ``(height, width)`` of the generated scenes.
        num_train: Number of training scenes.
        num_val: Number of validation scenes.
        num_test: Number of test scenes.
        max_objects: Maximum number of objects per scene.
        seed: Seed of the scenes and of the train shuffling.
        batch_size: Samples per batch.
        num_workers: Data-loading worker processes.
        crop_size: ``(height, width)`` of the random train crop; ``None`` (default) disables cropping.
        scale_range: Random train rescale range; the default ``(1.0, 1.0)`` keeps texture periods intact.
        hflip: Whether to randomly flip training samples horizontally.
        ignore_index: Mask value ignored by losses and metrics (only produced by crop padding here).
    """

    def __init__(
        self,
        num_classes: int = 6,
        image_size: tuple[int, int] = (128, 128),
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 64,
        max_objects: int = 6,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        hflip: bool = True,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            batch_size=batch_size,
            num_workers=num_workers,
            crop_size=crop_size,
            scale_range=scale_range,
            hflip=hflip,
            ignore_index=ignore_index,
            seed=seed,
        )
        if num_classes > MAX_CLASSES:
            raise ValueError(f"num_classes must be <= {MAX_CLASSES} for synthetic scenes, got {num_classes}")
        check_positive("num_train", num_train)
        check_positive("num_val", num_val)
        check_positive("num_test", num_test)
        check_positive("max_objects", max_objects)
        size = tuple(image_size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"image_size must be (height, width) with both >= 16, got {image_size}")
        self.image_size = size
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.max_objects = max_objects
        self.save_hyperparameters()

    def _dataset(self, split: str, length: int, transform: SegmentationTransform) -> SyntheticScenesDataset:
        return SyntheticScenesDataset(
            split, length, self.num_classes, self.image_size, self.max_objects, self.seed, transform
        )

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        return (
            self._dataset("train", self.num_train, self.train_transform()),
            self._dataset("val", self.num_val, self.eval_transform()),
            self._dataset("test", self.num_test, self.eval_transform()),
        )
