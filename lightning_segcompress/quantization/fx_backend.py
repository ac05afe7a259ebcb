"""torch.ao FX graph-mode quantization: prepare (QAT or observers), freeze, convert to int8 modules."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lightning_segcompress.quantization.config import QuantizationConfig, QuantizationError
from lightning_segcompress.quantization.tracing import (
    restore_modules,
    split_norm_act,
    tracing_friendly,
    untraceable_module,
)


def prepare_fx(network: nn.Module, config: QuantizationConfig, example: torch.Tensor) -> torch.fx.GraphModule:
    """Trace ``network`` and insert fake-quant modules (QAT) or observers (PTQ). The returned GraphModule shares
    the float parameters with ``network``, which computes the same function as before (timm's BN+activation
    modules are split, see :func:`split_norm_act`) and is restored exactly if preparing fails."""
    torch.backends.quantized.engine = config.engine
    split = split_norm_act(network)
    try:
        return _prepare(network, config, example)
    except Exception:
        restore_modules(split)  # the float network is left exactly as it was
        raise


def _prepare(network: nn.Module, config: QuantizationConfig, example: torch.Tensor) -> torch.fx.GraphModule:
    from torch.ao.quantization import (
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx as ao_prepare_fx
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    failure = untraceable_module(network, config.keep_float)
    if failure is not None:
        name, kind, err = failure
        where = f"module {name!r} ({kind})" if name else f"the forward of {kind} itself"
        raise QuantizationError(
            f"torch.fx cannot trace {where}: {type(err).__name__}: {str(err).strip().splitlines()[0][:300]}. "
            + (f"Keep it in float with keep_float: [{name}] (it is then not quantized), or use backend: pt2e "
               "(torch.export traces more Python)." if name else
               "Make the forward traceable (no Python control flow on tensor values) or use backend: pt2e."))
    if config.qat:
        qconfig_mapping = get_default_qat_qconfig_mapping(config.engine)
    else:
        qconfig_mapping = get_default_qconfig_mapping(config.engine)
    for name in (*config.keep_float, *dilated_depthwise_convs(network)):
        qconfig_mapping.set_module_name(name, None)
    custom = PrepareCustomConfig().set_non_traceable_module_names(list(config.keep_float))
    was_training = network.training
    network.train(config.qat)
    try:
        with tracing_friendly(network), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare = prepare_qat_fx if config.qat else ao_prepare_fx
            prepared = prepare(network, qconfig_mapping, (example,), prepare_custom_config=custom)
    except Exception as err:
        raise QuantizationError(f"FX quantization could not prepare {type(network).__name__}: "
                                f"{type(err).__name__}: {err}. Name the offending module in keep_float or use "
                                "backend: pt2e.") from err
    finally:
        network.train(was_training)
    prepared.train(was_training)
    return prepared


def dilated_depthwise_convs(network: nn.Module) -> list[str]:
    """Depthwise convolutions with dilation stay float: measured with the x86 engine, their int8 kernel took
    29 ms per call for DeepLabV3+'s 960-channel convs at 16x16, the float one under 2 ms (qnnpack not measured)."""
    return [name for name, m in network.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and tuple(m.dilation) != (1, 1)]


def convert_fx(prepared: nn.Module, config: QuantizationConfig) -> torch.fx.GraphModule:
    """A CPU int8 copy of the prepared model (``prepared`` itself is unchanged)."""
    from torch.ao.quantization.fx import utils as fx_utils
    from torch.ao.quantization.quantize_fx import convert_fx as ao_convert_fx

    torch.backends.quantized.engine = config.engine
    model = copy.deepcopy(prepared).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ao_convert_fx(model)
    # torch.ao caches this lookup per module: the cache would keep the prepared copy alive for the whole process
    cached = getattr(fx_utils.assert_and_get_unique_device, "cache_clear", None)
    if cached is not None:
        cached()
    return converted


def freeze_batchnorm_fx(prepared: nn.Module) -> None:
    """Stop updating BN running statistics in fused conv-BN QAT modules (they keep folding the frozen ones)."""
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    prepared.apply(freeze_bn_stats)
