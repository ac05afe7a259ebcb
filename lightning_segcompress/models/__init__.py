"""The reference LightningModule, the network factory and the one loader of the ``segcompress`` tools."""

from __future__ import annotations

import importlib

# Imported on first use (PEP 562): models.loading serves ``segcompress <tool> --help`` without importing torch.
_EXPORTS = {"build_network": "lightning_segcompress.models.factory",
            "SegmentationModule": "lightning_segcompress.models.segmentation_module"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
