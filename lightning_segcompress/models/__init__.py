from lightning_segcompress.models.factory import build_network
from lightning_segcompress.models.segmentation_module import SegmentationModule

__all__ = ["SegmentationModule", "build_network"]
