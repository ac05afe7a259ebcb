"""The structured-pruning stage of a network's compression state: the input shape used for tracing and
torch-pruning's pruning history, both plain data."""

from __future__ import annotations

import torch
from torch import nn

from lightning_segcompress.pruning.graph import History, PruningError, replay_history
from lightning_segcompress.state import get_stages, set_stage
from lightning_segcompress.utils.inspection import example_input

KIND = "structured_pruning"


def pruning_history(network: nn.Module) -> History:
    """The pruning history applied to ``network`` so far (empty when it was never pruned)."""
    for stage in get_stages(network):
        if stage["kind"] == KIND:
            return stage["history"]
    return []


def prune_with_history(network: nn.Module, history: History, example: torch.Tensor) -> None:
    """Apply ``history`` (new steps only) to ``network`` and record it in its compression state, atomically."""
    replay_history(network, history, example)
    history = pruning_history(network) + history
    set_stage(network, {"kind": KIND, "input_shape": list(example.shape), "history": history})


def apply_stage(network: nn.Module, stage: dict, applied: dict | None) -> None:
    """Bring ``network`` to the pruned architecture of ``stage`` (skipping the steps it already has)."""
    done = applied["history"] if applied else []
    target = stage["history"]
    if target[: len(done)] != done:
        raise PruningError("The network was already pruned differently from the checkpoint; load the checkpoint "
                           "into a freshly built (unpruned) network.")
    remaining = target[len(done):]
    if not remaining:
        return
    shape = stage["input_shape"]
    example = example_input(network, size=tuple(shape[2:]), batch_size=shape[0], channels=shape[1])
    replay_history(network, remaining, example)
    set_stage(network, {"kind": KIND, "input_shape": list(shape), "history": target})
