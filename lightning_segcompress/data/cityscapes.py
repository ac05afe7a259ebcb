"""Cityscapes (fine annotations), mapped to the 19 standard training classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .base import SegmentationDataModule
from .folder import SegmentationFolderDataset
from .transforms import SegmentationTransform

#: labelIds of the 19 evaluated classes, in trainId order.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)  # fmt: skip


def label_ids_to_train_ids(label_ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Maps Cityscapes labelIds to trainIds 0..18; every other id (including -1) becomes ``ignore_index``."""
    lut = np.full(256, ignore_index, dtype=np.int64)
    lut[list(CITYSCAPES_LABEL_IDS)] = np.arange(len(CITYSCAPES_LABEL_IDS))
    ids = np.asarray(label_ids).astype(np.int64)
    return np.where((ids >= 0) & (ids < lut.size), lut[np.clip(ids, 0, lut.size - 1)], ignore_index)


def index_split(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, labelIds)`` path pairs of one split, sorted."""
    image_root = root / "leftImg8bit" / split
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"{image_root} does not exist; extract leftImg8bit_trainvaltest.zip into {root} "
            "(or set root to the folder that holds leftImg8bit/ and gtFine/)"
        )
    images = sorted(image_root.glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no <city>/*_leftImg8bit.png files under {image_root}")
    pairs, missing = [], []
    for image in images:
        name = image.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / image.parent.name / f"{name}_gtFine_labelIds.png"
        (pairs if label.is_file() else missing).append((image, label))
    if missing:
        examples = [str(label) for _, label in missing[:3]]
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {image_root} have no gtFine labelIds file, e.g. {examples}; "
            f"extract gtFine_trainvaltest.zip into {root}"
        )
    return pairs


class CityscapesDataset(SegmentationFolderDataset):
    """Cityscapes images with labelIds converted to trainIds.

    Args:
        pairs: ``(image_path, labelIds_path)`` pairs.
        ignore_index: Label of every id outside the 19 training classes.
        transform: Joint transform applied to ``(image, mask)``.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        ignore_index: int = 255,
        transform: SegmentationTransform | None = None,
    ) -> None:
        super().__init__(pairs, len(CITYSCAPES_LABEL_IDS), ignore_index, transform)

    def decode_mask(self, mask_image: Image.Image, mask_path: Path) -> np.ndarray:
        return label_ids_to_train_ids(np.asarray(mask_image), self.ignore_index)


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine annotations with the 19 training classes (``num_classes`` is fixed at 19).

    Expects ``root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` and
    ``root/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png``. The official test labels are not
    public, so the test and predict loaders use the val split.

    Args:
        root: Folder holding ``leftImg8bit/`` and ``gtFine/``.
        crop_size: ``(height, width)`` of the random train crop; ``None`` disables cropping.
        scale_range: ``(min, max)`` factor of the random train rescale.
        image_size: ``(height, width)`` all samples are resized to before augmentation; ``None`` keeps
            the full 1024x2048 resolution.
        batch_size: Samples per batch.
        num_workers: Data-loading worker processes.
        hflip: Whether to randomly flip training samples horizontally.
        ignore_index: Label of void pixels, ignored by losses and metrics.
        seed: Seed of the train shuffling.
    """

    predict_split = "val"

    def __init__(
        self,
        root: str,
        crop_size: tuple[int, int] | None = (512, 1024),
        scale_range: tuple[float, float] = (0.5, 2.0),
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        hflip: bool = True,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        super().__init__(
            num_classes=len(CITYSCAPES_CLASSES),
            batch_size=batch_size,
            num_workers=num_workers,
            crop_size=crop_size,
            scale_range=scale_range,
            hflip=hflip,
            ignore_index=ignore_index,
            image_size=image_size,
            seed=seed,
        )
        self.root = Path(root).expanduser()
        self.class_names = CITYSCAPES_CLASSES
        self.save_hyperparameters()

    def _build_datasets(self) -> tuple[Dataset, Dataset, None]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Cityscapes root {self.root} does not exist; set root to the folder holding leftImg8bit/ "
                "and gtFine/ (download both zips from cityscapes-dataset.com)"
            )
        train = CityscapesDataset(index_split(self.root, "train"), self.ignore_index, self.train_transform())
        val = CityscapesDataset(index_split(self.root, "val"), self.ignore_index, self.eval_transform())
        return train, val, None
