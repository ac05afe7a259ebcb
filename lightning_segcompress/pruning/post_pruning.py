"""Validation-guided post-pruning (after Wei Liu 2021, REFERENCE §5; reduced-error pruning of decision trees):
before a pruning step is applied, measure what each planned group costs on its own and keep back the ones that
cost too much."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_segcompress.pruning.graph import History, PruningError, replay_history
from lightning_segcompress.utils.batchnorm import batchnorm_buffers, restore_batchnorm_buffers
from lightning_segcompress.utils.rollback import restore, snapshot

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


def group_costs(network: nn.Module, step: History, evaluate: Evaluator, example: torch.Tensor,
                max_miou_drop: float, prepare: Callable[[nn.Module], object] | None = None) -> PostPruningResult:
    """Score ``network`` (as it is before the step), then each entry of ``step`` applied alone to it. An entry whose
    removal costs more than ``max_miou_drop`` points (``100 * score drop``) is kept back (``undone``).

    ``prepare(network)`` runs before each score, the unpruned one included, e.g. a BatchNorm re-estimation
    (:func:`lightning_segcompress.utils.batchnorm.reestimate_batchnorm`), so that a group is judged by what its
    pruned network can do rather than by statistics measured on another one; the statistics are put back after.

    Each entry is tried on ``network`` itself and rolled back right after, so no copy of the network is made and
    ``network`` ends exactly as it was (the same parameter objects, so optimizers stay valid)."""
    if max_miou_drop < 0:
        raise PruningError(f"max_miou_drop must be >= 0 (mIoU points a group may cost), got {max_miou_drop}.")

    def score() -> float:
        if prepare is None:
            return evaluate(network)
        saved = batchnorm_buffers(network)
        try:
            prepare(network)
            return evaluate(network)
        finally:
            restore_batchnorm_buffers(saved)

    result = PostPruningResult(baseline=score())
    for entry in step:
        restore_point = snapshot(network)
        try:
            replay_history(network, [entry], example)
            cost = (result.baseline - score()) * 100
        finally:
            restore(network, restore_point)
        undone = cost > max_miou_drop
        result.groups.append(GroupCost(layer=entry[0], channels=len(entry[2]), cost=cost, undone=undone))
        if not undone:
            result.kept.append(entry)
    return result
