"""Quantization (pure torch): FX graph mode and PT2E, QAT and PTQ, with int8 conversion and plain-data state."""

from lightning_segcompress.quantization.config import QuantizationConfig, QuantizationError, resolve_keep_float
from lightning_segcompress.quantization.quantize import (
    calibrate,
    convert_network,
    freeze_batchnorm,
    freeze_observers,
    prepare_network,
    quantization_stage,
)

__all__ = [
    "QuantizationConfig",
    "QuantizationError",
    "calibrate",
    "convert_network",
    "freeze_batchnorm",
    "freeze_observers",
    "prepare_network",
    "quantization_stage",
    "resolve_keep_float",
]
