"""Making real segmentation networks traceable, and naming the module where tracing fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def tracing_friendly(network: nn.Module) -> Iterator[None]:
    """Switch off eager-only input checks while ``network`` is traced.

    smp models check that H and W divide the output stride with a Python ``if`` on the input's shape, which
    symbolic tracing cannot follow (``torch.jit`` tracing and ``torch.compile`` already skip it).
    """
    switched = [m for m in network.modules() if getattr(m, "requires_divisible_input_shape", False) is True]
    for module in switched:
        module.requires_divisible_input_shape = False
    try:
        yield
    finally:
        for module in switched:
            module.requires_divisible_input_shape = True


class _LocatingTracer(torch.fx.Tracer):
    """A symbolic tracer that remembers which modules it is inside, so a failure can name the innermost one."""

    def __init__(self, leaves: tuple[str, ...]) -> None:
        super().__init__()
        self.leaves = leaves
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def untraceable_module(network: nn.Module, leaves: tuple[str, ...]) -> tuple[str, str, BaseException] | None:
    """``(module name, module type, error)`` of the innermost module that torch.fx cannot trace, or None."""
    tracer = _LocatingTracer(leaves)
    with tracing_friendly(network):
        try:
            tracer.trace(network)
        except Exception as err:  # noqa: BLE001 - any tracing failure is reported with its location
            name = tracer.failed_in[-1] if tracer.failed_in else ""
            kind = type(network.get_submodule(name)).__name__ if name else type(network).__name__
            return name, kind, err
    return None


def split_norm_act(network: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace timm's fused ``BatchNormAct2d`` (one module calling ``F.batch_norm`` then its activation) by
    ``Sequential(BatchNorm2d, drop, act)`` sharing the same parameters and statistics, so that FX quantization
    folds the BN into the preceding convolution. Otherwise every such BN stays float between a dequantize and
    a quantize, and the int8 MobileNetV3 is slower than fp32. Returns ``(parent, name, original)`` for
    :func:`restore_modules`. Parameter names gain a ``.0`` (e.g. ``bn1.0.weight``)."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return []
    replaced = []
    for name, module in list(network.named_modules()):
        if type(module) is not BatchNormAct2d:
            continue
        bn = nn.BatchNorm2d(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                            track_running_stats=module.track_running_stats)
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, attr, getattr(module, attr))
        bn.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, child, nn.Sequential(bn, module.drop, module.act))
        replaced.append((parent, child, module))
    return replaced


def restore_modules(replaced: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, child, module in reversed(replaced):
        setattr(parent, child, module)
