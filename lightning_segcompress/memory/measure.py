"""What eager PyTorch actually holds: the peak of live tensor bytes during one forward pass."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_segcompress.utils.inspection import evaluation_mode


class _LiveTensorBytes(TorchDispatchMode):
    """Counts each storage created inside the mode from its first tensor until its last tensor is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.refs.get(key)
        if entry is None:
            entry = self.refs[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[key]


def measured_peak_bytes(network: nn.Module, example: torch.Tensor) -> int:
    """Peak bytes of tensors alive during ``network(example)`` in eager eval mode, without autograd, counting
    the input and every tensor the forward allocates (not weights, not kernels' scratch space)."""
    tracker = _LiveTensorBytes()
    with evaluation_mode(network), tracker:
        output = network(example)
    del output
    return tracker.peak + example.untyped_storage().nbytes()
