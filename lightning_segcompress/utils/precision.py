"""Device, dtype and autocast helpers shared by the techniques (pure torch): whatever a technique builds next to a
network (a teacher, a connector, a shunt, an example input) follows the network's device and floating dtype, and
what must be computed in float32 (losses, tracing, int8) runs with autocast switched off."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def floating_dtype(network: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``network``'s first floating-point parameter (or buffer); ``default`` without any."""
    for tensor in itertools.chain(network.parameters(), network.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return default


def follow(module: nn.Module, network: nn.Module) -> nn.Module:
    """Move ``module`` to ``network``'s device and floating dtype (integer buffers keep theirs); returns it."""
    reference = next(itertools.chain(network.parameters(), network.buffers()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    return module.to(device=device, dtype=floating_dtype(network))


@contextlib.contextmanager
def autocast_disabled(device_types: Iterable[str | torch.device] = ("cpu",)) -> Iterator[None]:
    """Switch autocast off for ``device_types`` (and the CPU): e.g. around tracing, so that no reduced-precision
    casts are baked into a graph, or around a loss that must be computed in float32."""
    types = {"cpu"} | {torch.device(t).type for t in device_types}
    with contextlib.ExitStack() as stack:
        for kind in sorted(types):
            if kind in ("cpu", "cuda", "xpu", "mps", "hpu") and _autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def autocast_active(device_types: Iterable[str] = ("cpu", "cuda")) -> bool:
    return any(_autocast_enabled(kind) for kind in device_types)


def _autocast_enabled(kind: str) -> bool:
    try:
        return torch.is_autocast_enabled(kind)
    except (TypeError, RuntimeError):  # older torch: is_autocast_enabled() is CUDA's, CPU has its own
        return torch.is_autocast_cpu_enabled() if kind == "cpu" else kind == "cuda" and torch.is_autocast_enabled()
