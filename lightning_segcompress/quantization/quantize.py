"""Backend-independent entry points: prepare, calibrate, freeze, convert; each records the compression stage."""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from lightning_segcompress.quantization import fx_backend, pt2e_backend
from lightning_segcompress.quantization.config import QuantizationConfig, QuantizationError
from lightning_segcompress.state import (
    CHECKPOINT_STATE_ATTRIBUTE,
    carry_stages,
    get_stages,
    set_stage,
)
from lightning_segcompress.utils.inspection import example_input
from lightning_segcompress.utils.precision import autocast_active, autocast_disabled, floating_dtype

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
    example = tracing_example(network, config)
    with autocast_disabled([example.device]):  # no reduced-precision casts baked into the graph
        prepared = backend(network, config, example)
    run_in_float32(prepared)
    carry_stages(network, prepared)
    set_stage(prepared, {"kind": KIND, "config": config.as_dict(), "converted": False})
    return prepared


def convert_network(prepared: nn.Module) -> nn.Module:
    """The int8 model of a prepared (trained or calibrated) network; ``prepared`` is unchanged (and may stay on a
    GPU: the conversion runs on a CPU copy, with autocast off).

    FX: torch.ao quantized modules (CPU; runs in eager and the TorchScript lite interpreter). PT2E: a graph of
    quantize/dequantize + float ops that ExecuTorch's XNNPACK delegate runs as int8 (``export_executorch``).
    Either way the int8 network lives on the CPU for good (see :func:`pin_to_cpu`).
    """
    stage = _require_stage(prepared, converted=False)
    config = QuantizationConfig.from_dict(stage["config"])
    with autocast_disabled(["cuda"]):
        if config.backend == "fx":
            converted = fx_backend.convert_fx(prepared, config)  # converts a CPU copy
        else:
            converted = pt2e_backend.convert_pt2e(prepared)  # converts a CPU copy
            # its scales are graph constants: checkpoints store the prepared state, converted again on load
            converted.__dict__[CHECKPOINT_STATE_ATTRIBUTE] = _cpu_copy(prepared.state_dict())
    carry_stages(prepared, converted)
    set_stage(converted, {**stage, "converted": True})
    return pin_to_cpu(converted)


# ---- fake quantization runs in float32 ------------------------------------------------------------------------

_AUTOCAST_STACK = "_segcompress_autocast_stack"


def run_in_float32(prepared: nn.Module) -> None:
    """Run ``prepared`` (fake-quant or observers) in its own dtype with autocast off, also when it is called under
    ``16-mixed`` / ``bf16-mixed`` autocast: fake quantization and observers take float32 only, and int8 ranges are
    learnt in float32. The rest of the training step (loss, teacher, other modules) keeps the trainer's autocast.
    Forward hooks, so that copies made for conversion (which drop hooks) are plain graphs."""
    prepared.register_forward_pre_hook(_autocast_off_pre_hook, with_kwargs=True)
    prepared.register_forward_hook(_autocast_off_post_hook, with_kwargs=True, always_call=True)


def _autocast_off_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    stack = module.__dict__.setdefault(_AUTOCAST_STACK, [])
    if not autocast_active():
        stack.append(None)
        return None
    dtype = floating_dtype(module)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    context = autocast_disabled([t.device for t in tensors])
    context.__enter__()
    stack.append(context)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return _map_tensors(args, cast), _map_tensors(kwargs, cast)


def _autocast_off_post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    stack = module.__dict__.get(_AUTOCAST_STACK)
    context = stack.pop() if stack else None
    if context is not None:
        context.__exit__(None, None, None)
    return None


# ---- int8 networks stay on the CPU -----------------------------------------------------------------------------

_PINNED = "_segcompress_cpu_pinned"
_INNER_FORWARD = "_segcompress_int8_forward"
_GRAPH_PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY


def pin_to_cpu(network: nn.Module) -> nn.Module:
    """Keep an int8 ``network`` on the CPU and in float32 for good, wherever the module holding it goes.

    int8 kernels are CPU kernels (FX's ``torch.ao`` quantized modules have no CUDA kernels; a PT2E graph is the
    reference int8 model for ExecuTorch). So the network stays in the module tree (checkpoints, stages, export and
    benchmarks see it as it is) but ignores device and dtype moves (``.to("cuda")``, ``.half()``: Lightning's
    ``model_to_device`` moves the whole LightningModule before ``validate`` / ``test``), and its forward moves
    tensor inputs to the CPU as float32, runs with autocast off, and returns outputs on the first input's device
    and in its floating dtype. On CPU float32 inputs without autocast the forward is the int8 network's own (what
    exporters trace). Survives ``copy.deepcopy``. Returns ``network``."""
    if network.__dict__.get(_PINNED):
        return network
    inner = network.__dict__.get("forward")  # a forward set on the instance (PT2E's train/eval sync), or the class's
    attributes = {_INNER_FORWARD: inner if inner is not None else types.MethodType(type(network).forward, network),
                  _PINNED: True,
                  "forward": types.MethodType(_pinned_forward, network),
                  "_apply": types.MethodType(_pinned_apply, network)}
    for name, value in attributes.items():
        network.__dict__[name] = value
    if isinstance(network, torch.fx.GraphModule):  # GraphModule's deepcopy keeps only these instance attributes
        network.meta.setdefault(_GRAPH_PRESERVED, {}).update(attributes)
    return network


def is_cpu_pinned(network: nn.Module) -> bool:
    """Whether ``network`` is an int8 network kept on the CPU by :func:`pin_to_cpu`."""
    return bool(network.__dict__.get(_PINNED))


def _pinned_forward(self: nn.Module, *args, **kwargs):
    inner = self.__dict__[_INNER_FORWARD]
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    first = tensors[0] if tensors else None
    if first is None or (not autocast_active() and all(
            t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)):
        return inner(*args, **kwargs)  # what exporters and CPU benchmarks trace: the int8 network's own forward
    out_device = first.device
    out_dtype = first.dtype if first.is_floating_point() else torch.float32
    with autocast_disabled([out_device]):
        output = inner(*_to_cpu(args), **_to_cpu(kwargs))
    return _map_tensors(output, lambda t: t.to(device=out_device, dtype=out_dtype if t.is_floating_point() else None))


def _to_cpu(value):
    return _map_tensors(value, lambda t: t.to(device="cpu", dtype=torch.float32 if t.is_floating_point() else None))


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((k, _map_tensors(v, fn)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, tuple):  # a named tuple
        return type(value)(*(_map_tensors(v, fn) for v in value))
    return value


def _pinned_apply(self: nn.Module, fn, recurse: bool = True):
    """``nn.Module._apply`` for moves that keep tensors on the CPU in float32 (``.cpu()``, ``.float()``,
    ``share_memory()``); any other move or cast (``.to("cuda")``, ``.to(torch.bfloat16)``) is ignored."""
    probe = fn(torch.zeros((), dtype=torch.float32))
    if isinstance(probe, torch.Tensor) and (probe.device.type != "cpu" or probe.dtype != torch.float32):
        return self
    return nn.Module._apply(self, fn, recurse)


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
