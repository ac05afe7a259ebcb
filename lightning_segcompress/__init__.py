"""Lightning callbacks that compress semantic-segmentation networks for embedded devices."""

from lightning_segcompress.compression_state import load_compressed
from lightning_segcompress.data import (
    CityscapesDataModule,
    PhotoTexturesDataModule,
    SegmentationFolderDataModule,
    SyntheticScenesDataModule,
)
from lightning_segcompress.models import SegmentationModule, build_network

__version__ = "0.1.0"

__all__ = [
    "CityscapesDataModule",
    "PhotoTexturesDataModule",
    "SegmentationFolderDataModule",
    "SegmentationModule",
    "SyntheticScenesDataModule",
    "build_network",
    "load_compressed",
]
