"""The open registry of stage appliers: for each stage kind, the function that brings a network to a stage.

An applier is ``applier(network, stage, applied)``: ``stage`` is the recorded dict (plain data, ``stage["kind"]`` is
the kind), ``applied`` the stage of the same index the network already went through (``None`` for a fresh one). It
changes ``network`` in place and returns ``None``, or returns the module that replaces it (e.g. a traced,
quantization-prepared GraphModule, with the stage history carried over).

The package's own kinds are registered here by path (imported only when a checkpoint needs them); a third-party
producer registers its kind when its module is imported (:class:`~lightning_segcompress.callbacks.CompressionProducer`
does it for its subclasses), so loading its checkpoints needs only that import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Applier = Callable[..., object]

_APPLIERS: dict[str, Applier | str] = {
    "structured_pruning": "lightning_segcompress.pruning.state:apply_stage",
    "quantization": "lightning_segcompress.quantization.state:apply_stage",
    "shunt": "lightning_segcompress.shunt.surgery:apply_stage",
}


def register_stage_applier(kind: str, applier: Applier | str, replace: bool = False) -> None:
    """Register ``applier`` (a callable or ``"module:function"``) for stages of ``kind``. Registering the same
    applier again is a no-op; another one for a known kind needs ``replace=True``."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"A stage kind is a non-empty string, got {kind!r}.")
    if not (callable(applier) or (isinstance(applier, str) and ":" in applier)):
        raise TypeError(f"The applier of {kind!r} must be a callable or 'module:function', got {applier!r}.")
    current = _APPLIERS.get(kind)
    if current is not None and not replace and current is not applier and _name(current) != _name(applier):
        raise ValueError(f"Stage kind {kind!r} already has an applier ({_name(current)}); pick another kind or pass "
                         "replace=True.")
    _APPLIERS[kind] = applier


def stage_applier(kind: str) -> Applier:
    """The applier of ``kind``; an unknown kind gets an error that says how to make it known."""
    if kind not in _APPLIERS:
        raise ValueError(f"The checkpoint has a compression stage of kind {kind!r}, and no applier is registered for "
                         f"it (known: {sorted(_APPLIERS)}). Import the module that defines the callback which wrote "
                         "it (its CompressionProducer subclass registers the kind), or call lightning_segcompress."
                         f"state.register_stage_applier({kind!r}, apply_fn), before loading; a kind of this package "
                         "that is missing here means the checkpoint was written by a newer lightning-segcompress.")
    applier = _APPLIERS[kind]
    if isinstance(applier, str):
        module_name, _, function = applier.partition(":")
        applier = getattr(importlib.import_module(module_name), function)
    return applier


def stage_kinds() -> list[str]:
    """Every registered stage kind."""
    return sorted(_APPLIERS)


def _name(applier: Applier | str) -> str:
    if isinstance(applier, str):
        return applier
    return f"{getattr(applier, '__module__', '?')}:{getattr(applier, '__qualname__', repr(applier))}"
