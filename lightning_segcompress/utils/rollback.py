"""One way to undo a change to a network: remember every module's attributes, and put them back.

Surgery (torch-pruning, splicing a shunt, replacing a layer) swaps in new Parameter, buffer and module objects and
rewrites attributes such as ``out_channels``; it does not mutate the old tensors in place, so a shallow copy of each
module's ``__dict__`` (and of its parameter, buffer and submodule dicts) undoes it exactly, compression stages
included. Training does mutate tensors in place: ``copy_weights=True`` also copies them (one copy of the weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

Snapshot = dict[str, dict]
_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def snapshot(network: nn.Module, copy_weights: bool = False) -> Snapshot:
    """Every module's attributes as they are now (with ``copy_weights``, copies of its parameters and buffers)."""
    state = {}
    for name, module in network.named_modules():
        attrs = dict(module.__dict__)
        for key in _CONTAINERS:
            if key in attrs:
                attrs[key] = type(attrs[key])(attrs[key])
        if copy_weights:
            for key, p in attrs.get("_parameters", {}).items():
                if p is not None:
                    attrs["_parameters"][key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for key, b in attrs.get("_buffers", {}).items():
                if b is not None:
                    attrs["_buffers"][key] = b.detach().clone()
        state[name] = attrs
    return state


def restore(network: nn.Module, state: Snapshot) -> None:
    """Put ``network`` back as it was when ``state`` was taken."""
    modules = dict(network.named_modules())
    for name, attrs in state.items():
        module = modules.get(name)
        if module is not None:
            module.__dict__.clear()
            module.__dict__.update(attrs)


@contextlib.contextmanager
def atomic(network: nn.Module) -> Iterator[None]:
    """Run a block that changes ``network``; if it raises, the network is restored exactly."""
    state = snapshot(network)
    try:
        yield
    except BaseException:
        restore(network, state)
        raise
