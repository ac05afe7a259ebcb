"""Validation-guided post-pruning (after Wei Liu 2021, REFERENCE §5; reduced-error pruning of decision trees):
after a pruning step, measure what each pruned group costs on its own and undo the ones that cost too much."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_segcompress.pruning.graph import History, PruningError, _restore, _snapshot, atomic, replay_history
from lightning_segcompress.pruning.state import prune_with_history, pruning_history
from lightning_segcompress.utils.inspection import copy_without_hooks

Evaluator = Callable[[nn.Module], float]


@dataclass
class GroupCost:
    layer: str  # the group's root layer
    channels: int  # channels the group removes
    cost: float  # score points lost when only this group is removed (score in [0, 1] -> points * 100)
    undone: bool = False

    def as_dict(self) -> dict:
        return {"layer": self.layer, "channels": self.channels, "cost_points": self.cost, "undone": self.undone}


@dataclass
class PostPruningResult:
    baseline: float  # score before the step
    groups: list[GroupCost] = field(default_factory=list)
    kept: History = field(default_factory=list)

    @property
    def undone(self) -> list[GroupCost]:
        return [g for g in self.groups if g.undone]


def group_costs(before: nn.Module, step: History, evaluate: Evaluator, example: torch.Tensor,
                tolerance: float) -> PostPruningResult:
    """Score ``before`` (the network as it was before the step), then each entry of ``step`` applied alone to a
    copy of it. An entry whose removal costs more than ``tolerance`` points (``100 * score drop``) is marked
    undone. ``before`` is not changed."""
    if tolerance < 0:
        raise PruningError(f"tolerance must be >= 0 (mIoU points a group may cost), got {tolerance}.")
    result = PostPruningResult(baseline=evaluate(before))
    for entry in step:
        trial = copy_without_hooks(before)
        replay_history(trial, [entry], example)
        cost = (result.baseline - evaluate(trial)) * 100
        undone = cost > tolerance
        result.groups.append(GroupCost(layer=entry[0], channels=len(entry[2]), cost=cost, undone=undone))
        if not undone:
            result.kept.append(entry)
    return result


def take_back(network: nn.Module, snapshot: dict, kept: History, example: torch.Tensor) -> None:
    """Put ``network`` back to ``snapshot`` (taken with :func:`snapshot_network` before the step) and apply only
    the ``kept`` entries of the step, recording them in its compression state. Atomic."""
    with atomic(network):
        _restore(network, snapshot)
        prune_with_history(network, kept, example)


def snapshot_network(network: nn.Module) -> tuple[dict, nn.Module, History]:
    """What post-pruning needs from right before a step: an in-place restore point, a copy to try groups on,
    and the pruning history so far."""
    return _snapshot(network), copy_without_hooks(network), pruning_history(network)
