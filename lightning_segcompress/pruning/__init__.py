"""Structured channel pruning (pure torch): torch-pruning's DepGraph for dependencies, named importances,
target search for MACs/params/channels/latency (a latency model of the deployment runtime), schedules, and
atomic replay of plain-data pruning histories."""

from lightning_segcompress.pruning.graph import PruningError, layer_widths, measure, replay_history
from lightning_segcompress.pruning.importance import IMPORTANCE_NAMES, build_importance
from lightning_segcompress.pruning.latency_model import LatencyModel, build_latency_model
from lightning_segcompress.pruning.pruner import Pruner
from lightning_segcompress.pruning.schedule import SCHEDULES, PruningSchedule
from lightning_segcompress.pruning.search import PruningConfig, StepPlan, plan_step
from lightning_segcompress.pruning.state import prune_with_history, pruning_history

__all__ = [
    "IMPORTANCE_NAMES",
    "LatencyModel",
    "SCHEDULES",
    "Pruner",
    "PruningConfig",
    "PruningError",
    "PruningSchedule",
    "StepPlan",
    "build_importance",
    "build_latency_model",
    "layer_widths",
    "measure",
    "plan_step",
    "prune_with_history",
    "pruning_history",
    "replay_history",
]
