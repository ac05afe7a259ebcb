"""Lightning callbacks that compress semantic-segmentation networks for embedded devices."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``segcompress --help`` and the tools' ``--help`` need no torch import.
_EXPORTS = {
    "CityscapesDataModule": "lightning_segcompress.data",
    "PhotoTexturesDataModule": "lightning_segcompress.data",
    "SegmentationFolderDataModule": "lightning_segcompress.data",
    "SyntheticScenesDataModule": "lightning_segcompress.data",
    "SegmentationModule": "lightning_segcompress.models",
    "build_network": "lightning_segcompress.models",
    "load_compressed": "lightning_segcompress.compression_state",
}

__all__ = sorted(_EXPORTS)

def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_segcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
