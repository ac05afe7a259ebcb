"""Segmentation data from a folder of images and PNG label maps."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import SegmentationDataModule
from .transforms import SegmentationTransform

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LABEL_MODES = ("L", "P", "I", "I;16")


def index_pairs(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` path pairs matched by file stem, sorted by stem."""
    for folder, kind in ((image_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{kind} folder {folder} does not exist; create it or fix the path")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in images:
                raise ValueError(
                    f"two images share the stem {path.stem!r} in {image_dir}; rename one of them"
                )
            images[path.stem] = path
    if not images:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {image_dir}")
    masks = {path.stem: path for path in mask_dir.iterdir() if path.suffix.lower() == ".png"}
    missing = sorted(set(images) - set(masks))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir}, e.g. {missing[:5]}; "
            "add a <stem>.png label map for each image or remove those images"
        )
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def check_labels(mask: np.ndarray, num_classes: int, ignore_index: int, path: Path) -> None:
    """Raises if ``mask`` holds values other than class ids and ``ignore_index``."""
    if mask.size == 0 or (mask.min() >= 0 and mask.max() < num_classes):
        return
    bad = np.unique(mask[((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)])
    if bad.size:
        raise ValueError(
            f"mask {path} has labels {bad[:10].tolist()} outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index}; set num_classes to cover them or ignore_index to the void label"
        )


class SegmentationFolderDataset(Dataset):
    """Loads RGB images and single-channel PNG label maps (values = class ids).

    Args:
        pairs: ``(image_path, mask_path)`` pairs.
        num_classes: Number of classes; other mask values must equal ``ignore_index``.
        ignore_index: Void label.
        transform: Joint transform applied to ``(image, mask)``.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        num_classes: int,
        ignore_index: int = 255,
        transform: SegmentationTransform | None = None,
    ) -> None:
        self.pairs, self.num_classes, self.ignore_index = pairs, num_classes, ignore_index
        self.transform = transform or SegmentationTransform(train=False, ignore_index=ignore_index)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = Image.open(image_path).convert("RGB")
        mask_image = Image.open(mask_path)
        if mask_image.size != image.size:
            raise ValueError(
                f"mask {mask_path} is {mask_image.size[0]}x{mask_image.size[1]} (WxH) but image {image_path} "
                f"is {image.size[0]}x{image.size[1]}; masks must have the same size as their image"
            )
        return self.transform(image, self.decode_mask(mask_image, mask_path))

    def decode_mask(self, mask_image: Image.Image, mask_path: Path) -> np.ndarray:
        """Class ids (int64) from a loaded label map; subclasses map other label encodings here."""
        if mask_image.mode not in LABEL_MODES:
            raise ValueError(
                f"mask {mask_path} has mode {mask_image.mode}; masks must be single-channel label maps "
                "(mode L or P) whose pixel values are class ids, so convert colour masks to class ids"
            )
        mask = np.asarray(mask_image).astype(np.int64)
        check_labels(mask, self.num_classes, self.ignore_index, mask_path)
        return mask


class SegmentationFolderDataModule(SegmentationDataModule):
    """Images and PNG label maps in a folder, in one of two layouts.

    Layout A: ``root/train/{image_dir,mask_dir}``, ``root/val/...`` and optionally ``root/test/...``.
    Layout B: ``root/{image_dir,mask_dir}``, split into train/val by ``val_fraction``.
    Masks are matched to images by file stem. The test and predict loaders use the test split when
    ``root/test`` exists, otherwise the val split.

    Args:
        root: Data folder.
        num_classes: Number of classes; mask values must be class ids or ``ignore_index``.
        image_dir: Name of the image folder (``.png``, ``.jpg`` or ``.jpeg`` files).
        mask_dir: Name of the mask folder (single-channel ``.png`` label maps).
        val_fraction: Fraction of images used for validation in layout B (ignored in layout A).
        split_seed: Seed of the layout-B split and of the train shuffling.
        image_size: ``(height, width)`` all samples are resized to; needed for batching images of
            different sizes in evaluation. ``None`` keeps the original size.
        batch_size: Samples per batch.
        num_workers: Data-loading worker processes.
        crop_size: ``(height, width)`` of the random train crop; ``None`` disables cropping.
        scale_range: ``(min, max)`` factor of the random train rescale.
        hflip: Whether to randomly flip training samples horizontally.
        ignore_index: Void label in the masks, ignored by losses and metrics.
    """

    def __init__(
        self,
        root: str,
        num_classes: int,
        image_dir: str = "images",
        mask_dir: str = "masks",
        val_fraction: float = 0.2,
        split_seed: int = 0,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
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
            image_size=image_size,
            seed=split_seed,
        )
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. use 0.2")
        self.root = Path(root).expanduser()
        self.image_dir, self.mask_dir, self.val_fraction = image_dir, mask_dir, val_fraction
        self.save_hyperparameters()

    def _pairs(self, folder: Path) -> list[tuple[Path, Path]]:
        return index_pairs(folder / self.image_dir, folder / self.mask_dir)

    def _split_pairs(self) -> tuple[list, list, list | None]:
        root = self.root
        if not root.is_dir():
            raise FileNotFoundError(
                f"data root {root} does not exist; set root to a folder with train/ and val/ subfolders "
                f"or with {self.image_dir}/ and {self.mask_dir}/ directly inside"
            )
        if (root / "train").is_dir():
            if not (root / "val").is_dir():
                raise FileNotFoundError(
                    f"{root / 'train'} exists but {root / 'val'} does not; add a val/ split, or put "
                    f"{self.image_dir}/ and {self.mask_dir}/ directly in {root} to split by val_fraction"
                )
            test = self._pairs(root / "test") if (root / "test").is_dir() else None
            return self._pairs(root / "train"), self._pairs(root / "val"), test
        pairs = self._pairs(root)
        if len(pairs) < 2:
            raise ValueError(f"{root} holds {len(pairs)} image(s); a train/val split needs at least 2")
        random.Random(self.seed).shuffle(pairs)
        num_val = min(len(pairs) - 1, max(1, round(len(pairs) * self.val_fraction)))
        return sorted(pairs[num_val:]), sorted(pairs[:num_val]), None

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset | None]:
        train, val, test = self._split_pairs()

        def dataset(pairs, transform):
            return SegmentationFolderDataset(pairs, self.num_classes, self.ignore_index, transform)

        return (
            dataset(train, self.train_transform()),
            dataset(val, self.eval_transform()),
            dataset(test, self.eval_transform()) if test is not None else None,
        )
