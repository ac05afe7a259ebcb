"""Shared bases of the segmentation data sets: the LightningDataModule and the seeded per-item generated dataset."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .transforms import SegmentationTransform

_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
_MASK64 = (1 << 64) - 1


def item_seed(seed: int, split: str, index: int) -> int:
    """A well-mixed 63-bit seed for one item (splitmix64 over seed, split and index)."""
    h = 0x9E3779B97F4A7C15
    for value in (seed, _SPLIT_IDS[split], index):
        h = ((h ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1


class SeededItems(Dataset):
    """``length`` generated items of one split; item ``i`` depends only on ``(seed, split, i)``: subclasses
    implement :meth:`render` (an image in [0, 1] and its mask from a seeded generator)."""

    def __init__(self, split: str, length: int, seed: int = 0, transform: SegmentationTransform | None = None) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        self.split, self.length, self.seed, self.transform = split, length, seed, transform

    def render(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        image, mask = self.render(torch.Generator().manual_seed(item_seed(self.seed, self.split, index)))
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask


def collate_segmentation(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks ``(image, mask)`` pairs, with a helpful error when their sizes differ."""
    sizes = {tuple(image.shape[-2:]) for image, _ in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"samples in one batch have different sizes {sorted(sizes)}; set crop_size (train) and "
            "image_size (eval) so every sample has the same size, or use batch_size=1"
        )
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)


def _check_pair(name: str, value: Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    value = tuple(value)
    if len(value) != 2 or any(int(v) != v or v <= 0 for v in value):
        raise ValueError(f"{name} must be two positive ints (height, width), got {value}")
    return int(value[0]), int(value[1])


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; set {name}={minimum} or more")


class SegmentationDataModule(pl.LightningDataModule):
    """Base class: validates the common options, builds transforms and data loaders.

    Subclasses implement :meth:`_build_datasets`, returning ``(train, val, test_or_None)`` data sets
    of ``(image, mask)`` pairs, and may override :attr:`predict_split`.

    Args:
        num_classes: Number of classes; mask values are in ``[0, num_classes)`` or ``ignore_index``.
        batch_size: Samples per batch (the train loader drops the last incomplete batch).
        num_workers: Data-loading worker processes; 0 loads in the main process.
        crop_size: ``(height, width)`` of the random train crop; ``None`` disables cropping.
        scale_range: ``(min, max)`` factor of the random train rescale; ``(1.0, 1.0)`` disables it.
        hflip: Whether to randomly flip training samples horizontally.
        ignore_index: Mask value ignored by losses and metrics.
        image_size: ``(height, width)`` every sample is resized to before augmentation; ``None`` keeps it.
        seed: Seed of the train loader's shuffling generator.
    """

    #: Split served by ``predict_dataloader``: "test" falls back to "val" when there is no test split.
    predict_split = "test"

    def __init__(
        self,
        *,
        num_classes: int,
        batch_size: int = 8,
        num_workers: int = 0,
        crop_size: Sequence[int] | None = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: bool = True,
        ignore_index: int = 255,
        image_size: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive("num_classes", num_classes, minimum=2)
        check_positive("batch_size", batch_size)
        check_positive("num_workers", num_workers, minimum=0)
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class id for num_classes={num_classes}; "
                "use a value outside [0, num_classes), e.g. 255"
            )
        scale_range = tuple(float(s) for s in scale_range)
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.crop_size = _check_pair("crop_size", crop_size)
        self.resize_size = _check_pair("image_size", image_size)
        self.scale_range = scale_range
        self.hflip = hflip
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def train_transform(self) -> SegmentationTransform:
        return SegmentationTransform(
            train=True,
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            hflip=self.hflip,
            size=self.resize_size,
            ignore_index=self.ignore_index,
        )

    def eval_transform(self) -> SegmentationTransform:
        return SegmentationTransform(train=False, size=self.resize_size, ignore_index=self.ignore_index)

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset | None]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build_datasets()

    def _loader(self, dataset: Dataset, train: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_segmentation,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the train split has {len(self.train_set)} samples, fewer than "
                f"batch_size={self.batch_size}, so drop_last leaves no batch; lower batch_size or add data"
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The test split if the data set has one with labels, otherwise the val split."""
        self.setup("test")
        return self._loader(self.test_set if self.test_set is not None else self.val_set)

    def predict_dataloader(self) -> DataLoader:
        """The split named by :attr:`predict_split` (test by default, val if there is no test split)."""
        self.setup("predict")
        if self.predict_split == "test" and self.test_set is not None:
            return self._loader(self.test_set)
        return self._loader(self.val_set)
