"""Replaying a checkpoint's quantization stage on a freshly built float network (before its weights load)."""

from __future__ import annotations

from torch import nn

from lightning_segcompress.quantization.config import QuantizationConfig, QuantizationError
from lightning_segcompress.quantization.pt2e_backend import shape_observers
from lightning_segcompress.quantization.quantize import convert_network, prepare_network, tracing_example
from lightning_segcompress.state import AFTER_LOAD_ATTRIBUTE


def apply_stage(network: nn.Module, stage: dict, applied: dict | None) -> nn.Module | None:
    """Prepare (and, if the checkpoint holds an int8 model, convert) the network the way the checkpoint's was;
    returns the replacement network. Weights, observers and scales come from the state dict afterwards.

    A converted PT2E graph holds its scales as constants, so its checkpoints store the state it was converted
    from (see :func:`~lightning_segcompress.quantization.convert_network`): it is restored as the prepared
    network, which is converted once that state is loaded, reproducing the int8 model exactly."""
    config = QuantizationConfig.from_dict(stage["config"])
    if applied is not None:
        if applied["config"] != stage["config"]:
            raise QuantizationError("The network was already prepared for quantization with another configuration "
                                    "than the checkpoint's; load it into a freshly built network.")
        return convert_network(network) if stage["converted"] and not applied["converted"] else None
    prepared = prepare_network(network, config)
    if config.backend == "pt2e":
        shape_observers(prepared, tracing_example(network, config))
        if stage["converted"]:
            prepared.__dict__[AFTER_LOAD_ATTRIBUTE] = convert_network
        return prepared
    return convert_network(prepared) if stage["converted"] else prepared
