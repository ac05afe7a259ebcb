"""Lightning callbacks that compress semantic-segmentation networks for embedded devices."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``segcompress --help`` and the tools' ``--help`` need no torch import.
_EXPORTS = {
    "CityscapesDataModule": "lightning_segcompress.data",
    "PhotoTexturesDataModule": "lightning_segcompress.data",
    "SegmentationFolderDataModule": "lightning_segcompress.data",
    "SyntheticScenesDataModule": "lightning_segcompress.data",
    "SegmentationModule": "lightning_segcompress.models",
    "build_network": "lightning_segcompress.models",
    "load_compressed": "lightning_segcompress.state",
}

__all__ = sorted(_EXPORTS)

# modules that moved into the cli/, state/ and models/ subpackages: the old paths import the new modules for one
# release, with a FutureWarning
_MOVED_MODULES = {
    "lightning_segcompress.benchmark_cli": "lightning_segcompress.cli.benchmark",
    "lightning_segcompress.cli_tools": "lightning_segcompress.cli.tools",
    "lightning_segcompress.compression_state": "lightning_segcompress.state",
    "lightning_segcompress.export_cli": "lightning_segcompress.cli.export",
    "lightning_segcompress.lightning_cli": "lightning_segcompress.cli.lightning_cli",
    "lightning_segcompress.loading": "lightning_segcompress.models.loading",
    "lightning_segcompress.memory_cli": "lightning_segcompress.cli.memory",
    "lightning_segcompress.shunt_cli": "lightning_segcompress.cli.shunt",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in _MOVED_MODULES else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {_MOVED_MODULES[spec.name]}; the old path will be removed in the next "
                      "release.", FutureWarning, stacklevel=2)
        return importlib.import_module(_MOVED_MODULES[spec.name])

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_segcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
