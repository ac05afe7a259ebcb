"""The deployable bundle of a network: the exported file (``.pte`` / ``.ptl``) and ``model.json`` next to it. Pure
torch (no Lightning import)."""

from lightning_segcompress.export.bundle import (
    BUNDLE_VERSION,
    IMAGENET_NORMALIZATION,
    RUNTIME_SUFFIXES,
    ExportError,
    bundle_from_report,
    check_output_path,
    data_normalization,
    default_class_names,
    metadata_path,
    network_to_export,
    write_bundle,
)

__all__ = ["BUNDLE_VERSION", "ExportError", "IMAGENET_NORMALIZATION", "RUNTIME_SUFFIXES", "bundle_from_report",
           "check_output_path", "data_normalization", "default_class_names", "metadata_path", "network_to_export",
           "write_bundle"]
