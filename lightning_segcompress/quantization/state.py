"""Replaying a checkpoint's quantization stage on a freshly built float network (before its weights load)."""

from __future__ import annotations

from torch import nn

from lightning_segcompress.quantization.config import QuantizationConfig, QuantizationError
from lightning_segcompress.quantization.pt2e_backend import shape_observers
from lightning_segcompress.quantization.quantize import convert_network, prepare_network, tracing_example


def apply_stage(network: nn.Module, stage: dict, applied: dict | None) -> nn.Module | None:
    """Prepare (and for FX convert, if the checkpoint holds an int8 model) the network the way the checkpoint's
    was; returns the replacement network. Weights, observers and scales come from the state dict afterwards."""
    config = QuantizationConfig.from_dict(stage["config"])
    if stage["converted"] and config.backend == "pt2e":
        raise QuantizationError(
            "This checkpoint holds a converted PT2E model, whose per-tensor scales are constants in its graph and "
            "cannot be restored from a state dict. Restore a checkpoint saved before conversion (the callback's "
            "checkpoints are) and convert again, or use the exported .pte.")
    if applied is not None:
        if applied["config"] != stage["config"]:
            raise QuantizationError("The network was already prepared for quantization with another configuration "
                                    "than the checkpoint's; load it into a freshly built network.")
        return convert_network(network) if stage["converted"] and not applied["converted"] else None
    prepared = prepare_network(network, config)
    if config.backend == "pt2e":
        shape_observers(prepared, tracing_example(network, config))
    return convert_network(prepared) if stage["converted"] else prepared
