"""Forward hooks that record what a network saw and produced: its input image, its output, and the tensors at
named layers. Layers are given as ``"module.name"`` (its output) or ``"module.name:input"`` (its input)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from lightning_segcompress.utils.inspection import match_module_names


class DistillationError(ValueError):
    """The student and teacher cannot be distilled as configured (raised before training starts)."""


def resolve_layer(network: nn.Module, spec: str, role: str) -> tuple[str, bool]:
    """``(module name, capture the input?)`` for ``spec``; the name may be a regex that selects one module."""
    name, _, where = spec.partition(":")
    if where not in ("", "input", "output"):
        raise DistillationError(f"{role} layer {spec!r}: the suffix after ':' must be 'input' or 'output'.")
    matches = match_module_names(network, [name])[name]
    if len(matches) != 1:
        examples = [n for n, _ in network.named_modules() if n][:8]
        found = f"matches {len(matches)} layers ({matches[:4]})" if matches else "matches no layer"
        raise DistillationError(f"{role} layer {name!r} {found} of {type(network).__name__}: name exactly one module, "
                         f"e.g. one of {examples} (see network.named_modules()).")
    return matches[0], where == "input"


class ForwardCapture:
    """Records the latest forward of ``network``: ``inputs`` (first positional argument), ``output`` and
    ``features[key]`` for the layers in ``layers`` (key -> layer spec). Tensors keep their autograd graph."""

    def __init__(self, network: nn.Module, layers: Mapping[str, str] | None = None, role: str = "student"):
        self.network = network
        self.layers = {key: resolve_layer(network, spec, role) for key, spec in (layers or {}).items()}
        self.inputs: torch.Tensor | None = None
        self.output = None
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def attach(self) -> ForwardCapture:
        self.detach()
        self._handles.append(self.network.register_forward_pre_hook(self._on_input))
        self._handles.append(self.network.register_forward_hook(self._on_output))
        modules = dict(self.network.named_modules())
        for key, (name, on_input) in self.layers.items():
            module = modules[name]
            if on_input:
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._store_input, key)))
            else:
                self._handles.append(module.register_forward_hook(functools.partial(self._store_output, key)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.inputs, self.output, self.features = None, None, {}

    def _on_input(self, module, args):
        self.features = {}
        self.inputs = args[0] if args else None

    def _on_output(self, module, args, output):
        self.output = output

    def _store_input(self, key, module, args):
        self.features[key] = args[0]

    def _store_output(self, key, module, args, output):
        self.features[key] = output if isinstance(output, torch.Tensor) else _first_tensor(output)

    def __deepcopy__(self, memo):
        """A deep copy of the hooked network (a pruning trial, a snapshot) gets hooks that record into an inert
        capture of its own, never into this one, and no copy of the tensors recorded here."""
        inert = ForwardCapture.__new__(ForwardCapture)
        inert.network, inert.layers, inert.inputs, inert.output, inert.features = None, self.layers, None, None, {}
        inert._handles = []
        return inert


def _first_tensor(output):
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"layer output of type {type(output).__name__} holds no tensor to distil")
