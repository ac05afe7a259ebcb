"""Segmentation DataModules: synthetic scenes and real-photo texture mosaics (no download), image folders and
Cityscapes."""

from lightning_segcompress.data.base import SegmentationDataModule
from lightning_segcompress.data.cityscapes import CityscapesDataModule
from lightning_segcompress.data.folder import SegmentationFolderDataModule
from lightning_segcompress.data.photo_textures import PhotoTexturesDataModule
from lightning_segcompress.data.synthetic import SyntheticScenesDataModule
from lightning_segcompress.data.transforms import SegmentationTransform

__all__ = [
    "CityscapesDataModule",
    "PhotoTexturesDataModule",
    "SegmentationDataModule",
    "SegmentationFolderDataModule",
    "SegmentationTransform",
    "SyntheticScenesDataModule",
]
