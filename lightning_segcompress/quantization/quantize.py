"""Backend-independent entry points: prepare, calibrate, freeze, convert; each records the compression stage."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from lightning_segcompress.compression_state import (
    CHECKPOINT_STATE_ATTRIBUTE,
    carry_stages,
    get_stages,
    set_stage,
)
from lightning_segcompress.quantization import fx_backend, pt2e_backend
from lightning_segcompress.quantization.config import QuantizationConfig, QuantizationError
from lightning_segcompress.utils.inspection import example_input

KIND = "quantization"


def quantization_stage(network: nn.Module) -> dict | None:
    """The network's quantization stage (``{"kind", "config", "converted"}``) or None."""
    stages = get_stages(network)
    return stages[-1] if stages and stages[-1]["kind"] == KIND else None


def tracing_example(network: nn.Module, config: QuantizationConfig) -> torch.Tensor:
    """A random input of ``config.example_shape`` on the network's device."""
    n, c, h, w = config.example_shape
    return example_input(network, size=(h, w), batch_size=n, channels=c)


def prepare_network(network: nn.Module, config: QuantizationConfig) -> nn.Module:
    """A traced copy of ``network`` with fake-quant modules (QAT) or observers (PTQ), sharing its parameters.
    ``network`` is left usable as it was; on failure a :class:`QuantizationError` names the module and the fix."""
    if quantization_stage(network) is not None:
        raise QuantizationError(f"{type(network).__name__} is already prepared for quantization.")
    backend = fx_backend.prepare_fx if config.backend == "fx" else pt2e_backend.prepare_pt2e
    prepared = backend(network, config, tracing_example(network, config))
    carry_stages(network, prepared)
    set_stage(prepared, {"kind": KIND, "config": config.as_dict(), "converted": False})
    return prepared


def convert_network(prepared: nn.Module) -> nn.Module:
    """The int8 model of a prepared (trained or calibrated) network; ``prepared`` is unchanged.

    FX: torch.ao quantized modules (CPU; runs in eager and the TorchScript lite interpreter). PT2E: a graph of
    quantize/dequantize + float ops that ExecuTorch's XNNPACK delegate runs as int8 (``export_executorch``).
    """
    stage = _require_stage(prepared, converted=False)
    config = QuantizationConfig.from_dict(stage["config"])
    if config.backend == "fx":
        converted = fx_backend.convert_fx(prepared, config)
    else:
        converted = pt2e_backend.convert_pt2e(prepared)
        # its scales are graph constants: checkpoints store the prepared state, converted again on load
        converted.__dict__[CHECKPOINT_STATE_ATTRIBUTE] = _cpu_copy(prepared.state_dict())
    carry_stages(prepared, converted)
    set_stage(converted, {**stage, "converted": True})
    return converted


def freeze_batchnorm(prepared: nn.Module) -> None:
    """From now on BN layers use and keep their running statistics (the usual last QAT epochs)."""
    config = QuantizationConfig.from_dict(_require_stage(prepared, converted=False)["config"])
    (fx_backend.freeze_batchnorm_fx if config.backend == "fx" else pt2e_backend.freeze_batchnorm_pt2e)(prepared)


def freeze_observers(prepared: nn.Module) -> None:
    """Keep the current quantization ranges (scales, zero points) fixed from now on."""
    _require_stage(prepared, converted=False)
    for module in prepared.modules():
        if callable(getattr(module, "disable_observer", None)):
            module.disable_observer()


def calibrate(prepared: nn.Module, images: Iterable[torch.Tensor], num_batches: int | None = None) -> int:
    """Run ``images`` batches through a PTQ-prepared network (eval, no grad) to set the observers' ranges.
    Returns the number of batches used."""
    _require_stage(prepared, converted=False)
    device = next(prepared.parameters()).device
    was_training = prepared.training
    prepared.eval()
    count = 0
    with torch.no_grad():
        for batch in images:
            if num_batches is not None and count >= num_batches:
                break
            prepared(batch.to(device))
            count += 1
    prepared.train(was_training)
    if count == 0:
        raise QuantizationError("calibration got no batches: give a dataloader with at least one batch.")
    return count


def _require_stage(network: nn.Module, converted: bool) -> dict:
    stage = quantization_stage(network)
    if stage is None:
        raise QuantizationError(f"{type(network).__name__} was not prepared for quantization: call prepare_network "
                                "first.")
    if stage["converted"] != converted:
        raise QuantizationError(f"{type(network).__name__} is already converted to int8.")
    return stage


def _cpu_copy(state: dict) -> OrderedDict:
    copied = OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())
    copied._metadata = copy.deepcopy(getattr(state, "_metadata", {}))  # module versions, as torch.save keeps them
    return copied
