"""Compression state as plain data: what was done to a network, stored in checkpoints and replayed on load.

Every technique that changes a network's architecture records a *stage* (a dict of plain values, e.g. a
pruning history) on the network itself. Checkpoints carry the stages under ``checkpoint["segcompress"]``;
loading replays them on a freshly built network before its weights are loaded, so a compressed checkpoint
restores with ``torch.load(weights_only=True)`` and never pickles a module. Pure torch: works on any
``nn.Module`` and on LightningModules alike.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any

from torch import nn

from lightning_segcompress.state.registry import stage_applier
from lightning_segcompress.utils.checkpoint_io import CheckpointError, read_checkpoint, state_dict_mismatch
from lightning_segcompress.utils.inspection import find_network, has_submodule

STAGES_ATTRIBUTE = "_segcompress_stages"
# a network whose own state dict cannot be loaded back (e.g. a converted PT2E graph, whose scales are constants)
# keeps here the state dict that checkpoints store instead ...
CHECKPOINT_STATE_ATTRIBUTE = "_segcompress_checkpoint_state"
# ... and its replayed stand-in keeps here the function that turns it into the real network once that state loaded
AFTER_LOAD_ATTRIBUTE = "_segcompress_after_load"
CHECKPOINT_KEY = "segcompress"
FORMAT_VERSION = 1

def get_stages(network: nn.Module) -> list[dict]:
    """The stages applied to ``network`` so far (a copy)."""
    return copy.deepcopy(getattr(network, STAGES_ATTRIBUTE, []))


def set_stage(network: nn.Module, stage: dict) -> None:
    """Record ``stage``: it replaces the last stage when that is of the same kind (a technique that works in
    steps keeps one growing record), otherwise it is appended. The list is replaced, never mutated, so a
    rollback of the network's attributes also rolls this back."""
    stages = get_stages(network)
    if stages and stages[-1]["kind"] == stage["kind"]:
        stages[-1] = copy.deepcopy(stage)
    else:
        stages.append(copy.deepcopy(stage))
    setattr(network, STAGES_ATTRIBUTE, stages)


def carry_stages(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a module that replaces ``source``, e.g. its traced copy) ``source``'s stage history."""
    setattr(target, STAGES_ATTRIBUTE, get_stages(source))


def apply_stages(network: nn.Module, stages: list[dict]) -> nn.Module:
    """Bring ``network`` to the architecture described by ``stages`` and return it (a new module where a stage
    replaces the network, e.g. quantization). Stages it already has are skipped, so this is safe to call twice
    (e.g. by a callback and by the module's own ``on_load_checkpoint``)."""
    applied = getattr(network, STAGES_ATTRIBUTE, [])
    for index, stage in enumerate(stages):
        kind = stage.get("kind")
        applier = stage_applier(kind)
        current = applied[index] if index < len(applied) else None
        if current is not None and current["kind"] != kind:
            raise ValueError(f"The network already went through {current['kind']!r} as stage {index}, but the "
                             f"checkpoint expects {kind!r}: load it into a freshly built network.")
        replacement = applier(network, stage, current)
        if replacement is not None:  # the applier recorded the stage history on the replacement
            network = replacement
    return network


def network_path(module: nn.Module, network: nn.Module) -> str:
    """Attribute path of ``network`` inside ``module`` ("" when they are the same)."""
    for name, candidate in module.named_modules():
        if candidate is network:
            return name
    raise ValueError(f"{type(network).__name__} is not a submodule of {type(module).__name__}.")


def write_to_checkpoint(checkpoint: dict, module: nn.Module, network_attribute: str | None = None) -> None:
    """Store the compression stages of ``module``'s network in ``checkpoint`` (nothing if uncompressed)."""
    network = find_network(module, network_attribute) if network_attribute != "" else module
    stages = get_stages(network)
    if stages:
        path = network_path(module, network)
        checkpoint[CHECKPOINT_KEY] = {"version": FORMAT_VERSION, "network_attribute": path, "stages": stages}
        stored = network.__dict__.get(CHECKPOINT_STATE_ATTRIBUTE)
        if stored is not None and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = _substitute_state(checkpoint["state_dict"], path, stored)


def _substitute_state(state: dict, path: str, stored: dict) -> OrderedDict:
    """``state`` with the entries under ``path`` replaced by ``stored``; the modules' version metadata is kept
    (without it, loading treats modules as their oldest version: torchao observers then reset ``eps``)."""
    prefix = path + "." if path else ""
    merged = OrderedDict((k, v) for k, v in state.items() if not k.startswith(prefix))
    merged.update((prefix + k, v) for k, v in stored.items())
    metadata = {k: v for k, v in getattr(state, "_metadata", {}).items() if not (k == path or k.startswith(prefix))}
    metadata.update({(prefix + k if k else path): v for k, v in getattr(stored, "_metadata", {}).items()})
    merged._metadata = metadata
    return merged


def finish_loading(network: nn.Module) -> nn.Module:
    """The network that a replayed stand-in becomes once its weights are loaded (``network`` itself if none)."""
    after_load = network.__dict__.pop(AFTER_LOAD_ATTRIBUTE, None)
    return network if after_load is None else after_load(network)


def _finish_after_load(module: nn.Module, path: str) -> None:
    """Once ``module``'s state dict is loaded, replace the stand-in at ``path`` by its :func:`finish_loading`."""
    if "_segcompress_after_load_hook" in module.__dict__:
        return

    def hook(mod: nn.Module, incompatible) -> None:
        module.__dict__.pop("_segcompress_after_load_hook").remove()
        if not incompatible.missing_keys:  # otherwise load_state_dict raises next
            replace_network(mod, path, finish_loading(mod.get_submodule(path)))

    module.__dict__["_segcompress_after_load_hook"] = module.register_load_state_dict_post_hook(hook)


def replace_network(module: nn.Module, path: str, network: nn.Module) -> None:
    """Put ``network`` at attribute path ``path`` of ``module``."""
    if not path:
        raise ValueError(f"{type(module).__name__} is itself the network and cannot be replaced in place; use the "
                         "returned network instead.")
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, name, network)


def restore_from_checkpoint(module: nn.Module, checkpoint: dict) -> nn.Module:
    """Replay the checkpoint's compression stages on ``module``'s network and return ``module`` (or, where
    ``module`` is itself the network and a stage replaces it, the replacement)."""
    entry = checkpoint.get(CHECKPOINT_KEY)
    if not entry:
        return module
    if entry.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"Compression state version {entry['version']} is newer than this lightning-segcompress "
                         f"understands ({FORMAT_VERSION}); upgrade the package.")
    path = entry.get("network_attribute", "")
    network = module.get_submodule(path) if path else module
    restored = apply_stages(network, entry["stages"])
    if path and AFTER_LOAD_ATTRIBUTE in restored.__dict__:
        _finish_after_load(module, path)
    if restored is network:
        return module
    if not path:
        return restored
    replace_network(module, path, restored)
    return module


def load_compressed(model: nn.Module, checkpoint_path: str | os.PathLike, strict: bool = True,
                    map_location: Any = "cpu") -> nn.Module:
    """Restore a compressed checkpoint into a freshly built ``model`` (a LightningModule or the bare network)
    in a process that has none of the callbacks: the architecture is replayed, then the weights are loaded.

    Example::

        model = MyLitModule(...)                      # built exactly as for training
        model = load_compressed(model, "runs/pruned.ckpt")  # now pruned, with the trained weights

    ``model`` may also be the bare network of the LightningModule that wrote the checkpoint (its keys are then
    read under the module's attribute, e.g. ``net.``). Returns ``model`` (a LightningModule keeps its identity; a
    bare network that a stage replaces, e.g. a quantized one, comes back as the replacement).
    """
    return _load_compressed(model, read_checkpoint(checkpoint_path, map_location=map_location), checkpoint_path, strict)


def _load_compressed(model: nn.Module, checkpoint: dict, checkpoint_path: str | os.PathLike,
                     strict: bool = True) -> nn.Module:
    """:func:`load_compressed` of an already read ``checkpoint``."""
    path = (checkpoint.get(CHECKPOINT_KEY) or {}).get("network_attribute")
    if path and not has_submodule(model, path):  # the bare network, given a LightningModule's checkpoint
        return _load_network_weights(model, checkpoint, checkpoint_path, CheckpointError,
                                     "Build the network exactly as for the run that wrote it.")
    model = restore_from_checkpoint(model, checkpoint)
    state_dict = checkpoint.get("state_dict", checkpoint)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as err:
        raise state_dict_mismatch(checkpoint_path, err, "Build the model exactly as for the run that wrote it.") \
            from None
    return finish_loading(model)


def load_network_weights(network: nn.Module, path: str | os.PathLike, error: type[Exception] = ValueError,
                         hint: str = "Check the network's class_path and init_args.") -> nn.Module:
    """Load a Lightning checkpoint or a bare state dict into ``network``, whatever prefix the keys carry (``net.``,
    ``model.``), replaying the checkpoint's compression stages first; returns the network (a replacement where a
    stage replaces it). Keys that match under no prefix raise ``error`` with ``hint``."""
    return _load_network_weights(network, read_checkpoint(path, what="weights file"), path, error, hint)


def _load_network_weights(network: nn.Module, checkpoint: dict, path: str | os.PathLike, error: type[Exception],
                          hint: str) -> nn.Module:
    """:func:`load_network_weights` of an already read ``checkpoint``."""
    entry = checkpoint.get(CHECKPOINT_KEY)
    if entry:
        network = apply_stages(network, entry["stages"])
    state = checkpoint.get("state_dict", checkpoint)
    wanted = set(network.state_dict())
    prefixes = [""] + sorted({k.split(".")[0] + "." for k in state if "." in k})
    for prefix in prefixes:
        candidate = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(candidate) == wanted:
            try:
                network.load_state_dict(candidate)
            except RuntimeError as err:
                raise error(str(state_dict_mismatch(path, err, hint))) from None
            return finish_loading(network)
    raise error(f"{path} holds no weights for {type(network).__name__}: its keys (e.g. {list(state)[:3]}) do not "
                f"match the network's (e.g. {list(wanted)[:3]}). {hint}")


def load_weights(module: nn.Module, path: str | os.PathLike, network_attribute: str | None = None) -> nn.Module:
    """Start any LightningModule (or bare network) ``module`` from trained weights, e.g. to compress a trained model:
    a Lightning checkpoint of the same module (compressed ones too) is loaded whole with :func:`load_compressed`;
    anything else (another wrapper's checkpoint, a bare state dict, keys with or without a ``net.``/``model.``
    prefix) into the module's network (``network_attribute``, default: found automatically). Returns ``module``
    (a bare network that a stage replaces comes back as the replacement)."""
    checkpoint = read_checkpoint(path, what="weights file")
    state = checkpoint.get("state_dict")
    if isinstance(state, dict) and _same_module(module, checkpoint):
        return _load_compressed(module, checkpoint, path)
    wrapper = network_attribute is not None or hasattr(module, "training_step")  # a LightningModule, duck-typed
    network = find_network(module, network_attribute) if wrapper else module
    hint = (f"Give weights written for this {type(module).__name__} (a checkpoint of it, or a state dict of its "
            "network).")
    if network is module:
        return _load_network_weights(module, checkpoint, path, CheckpointError, hint)
    loaded = _load_network_weights(network, checkpoint, path, CheckpointError, hint)
    if loaded is not network:
        replace_network(module, network_path(module, network), loaded)
    return module


def _same_module(module: nn.Module, checkpoint: dict) -> bool:
    """Whether ``checkpoint`` was written by a module like ``module`` (same keys, or its compressed network sits
    at a path ``module`` has)."""
    if set(checkpoint["state_dict"]) == set(module.state_dict()):
        return True
    entry = checkpoint.get(CHECKPOINT_KEY) or {}
    path = entry.get("network_attribute")
    if not entry or path is None:
        return False
    return has_submodule(module, path)
