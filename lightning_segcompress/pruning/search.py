"""Plan one pruning step that removes a requested fraction of MACs, parameters, channels or latency.

torch-pruning's ``pruning_ratio`` is a fraction of channels; MACs and parameters do not follow it linearly
(early high-resolution layers cost more MACs per channel). So the ratio is searched by bisection, each trial
pruning a throw-away copy and measuring it (``latency``: predicting it with a
:class:`~lightning_segcompress.pruning.latency_model.LatencyModel` of the deployment runtime). The plan that
comes out is a plain-data history, applied to the real network afterwards by replay (on every DDP rank alike).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from lightning_segcompress.pruning.floors import layer_floors, protect_floors
from lightning_segcompress.pruning.graph import (
    METRICS,
    History,
    PruningError,
    build_graph,
    layer_widths,
    measure,
    normalise_history,
    unsupported_layers,
)
from lightning_segcompress.pruning.importance import ROOT_TYPES, CachedImportance, compute_group_scores
from lightning_segcompress.pruning.latency_model import LatencyModel
from lightning_segcompress.utils.inspection import output_tensors

TARGETS = (*METRICS, "latency")  # what plan_step can remove a fraction of


@dataclass
class PruningConfig:
    """How to rank and cut channels (everything but the amount)."""

    ignored_layers: Sequence[str] = ()  # module names whose output channels are never pruned
    protected_layers: Sequence[str] = ()  # module names whose channels are never touched at all
    round_to: int | None = 8
    global_pruning: bool = True
    max_layer_fraction: float = 0.9  # most of a layer's reference width that pruning may remove
    reference_widths: dict[str, int] | None = None  # output channels per layer before the first step (else now)
    tolerance: float = 0.03  # relative to the requested fraction
    max_trials: int = 14


@dataclass
class StepPlan:
    history: History
    ratio: float  # torch-pruning channel ratio that produced the plan
    metric: str
    requested_fraction: float  # of the reference (unpruned) model
    achieved_fraction: float
    value: int | float  # the metric after the step (latency: predicted ms)
    tolerance: float = 0.03

    @property
    def error(self) -> float:
        """Relative distance of the achieved from the requested fraction."""
        return abs(self.achieved_fraction - self.requested_fraction) / self.requested_fraction

    @property
    def within_tolerance(self) -> bool:
        return self.error <= self.tolerance

    def as_dict(self) -> dict:
        return {"ratio": round(self.ratio, 6), "metric": self.metric, "requested_fraction": self.requested_fraction,
                "achieved_fraction": self.achieved_fraction, self.metric: self.value}


def check_supported(network: nn.Module, ignored: Sequence[str]) -> None:
    bad = {name: cls for name, cls in unsupported_layers(network).items()
           if not any(name == i or name.startswith(i + ".") for i in ignored)}
    if bad:
        listing = ", ".join(f"{n!r} ({c})" for n, c in bad.items())
        raise PruningError(
            f"torch-pruning has no pruner for layer(s) {listing}: they hold their own parameters, so their channels "
            f"cannot be cut consistently. Add them to ignored_layers (e.g. ignored_layers: {list(bad)[:3]}) to keep "
            "their channels, or register a torch-pruning customized pruner for the class."
        )


def plan_step(
    network: nn.Module,
    example: torch.Tensor,
    importance: Callable,
    metric: str,
    target_fraction: float,
    reference: float,
    config: PruningConfig,
    group_weights: dict[str, float] | None = None,
    latency_model: LatencyModel | None = None,
) -> StepPlan:
    """Find the channel ratio whose pruning leaves ``(1 - target_fraction) * reference`` of ``metric``.

    ``network`` is not modified. Importance is scored once on ``network`` (gradients for Taylor must be in
    ``.grad``) and reused for every trial, so all trials rank channels identically. ``metric="latency"``
    bisects on ``latency_model``'s predicted ms (``reference``: the unpruned network's, e.g.
    ``latency_model.reference_ms``).
    """
    if metric not in TARGETS:
        raise ValueError(f"metric must be one of {TARGETS}, got {metric!r}")
    if metric == "latency" and latency_model is None:
        raise ValueError("metric 'latency' needs a latency_model (pruning.latency_model.build_latency_model).")

    def evaluate(candidate: nn.Module) -> float:
        if metric == "latency":
            return latency_model.predict(candidate)
        return measure(candidate, example, [metric])[metric]

    check_supported(network, list(config.ignored_layers) + list(config.protected_layers))
    modules = dict(network.named_modules())
    graph = build_graph(network, example)
    ignored = [modules[n] for n in config.ignored_layers]
    scores = compute_group_scores(graph, importance, ignored, set(config.protected_layers), group_weights)
    if not scores:
        raise PruningError("no prunable channel group is left: every layer is ignored, protected or too narrow.")
    floors = layer_floors(graph, scores, ignored, config.max_layer_fraction, config.round_to,
                          config.reference_widths)
    scores = protect_floors(scores, floors, config.round_to)
    floors_by_layer = {name: kept for name, (kept, _) in floors.items()}
    current = evaluate(network)
    goal = (1.0 - target_fraction) * reference
    if current <= goal:  # already there (e.g. a resumed schedule); nothing to remove in this step
        return _plan([], 0.0, metric, target_fraction, reference, current, config)

    def trial(ratio: float) -> tuple[History, float, list[str]]:
        candidate = copy.deepcopy(network)
        for p in candidate.parameters():  # see build_graph: frozen layers must be in the traced graph
            p.requires_grad_(True)
        names = dict(candidate.named_modules())
        pruner = tp.pruner.MetaPruner(
            candidate, example, importance=CachedImportance(scores, candidate),
            global_pruning=config.global_pruning, pruning_ratio=ratio,
            max_pruning_ratio=config.max_layer_fraction, ignored_layers=[names[n] for n in config.ignored_layers],
            round_to=config.round_to, output_transform=output_tensors,
            root_module_types=ROOT_TYPES,
        )
        pruner.step()
        widths = layer_widths(candidate)
        broken = [f"{name} ({widths[name]} < {kept})" for name, kept in floors_by_layer.items()
                  if widths.get(name, kept) < kept]
        return normalise_history(pruner.pruning_history()), evaluate(candidate), broken

    best: tuple[float, float, History, float] | None = None  # (error, ratio, history, value)
    lo, hi = 0.0, config.max_layer_fraction
    for _ in range(config.max_trials):
        ratio = (lo + hi) / 2
        history, value, broken = trial(ratio)
        if broken:  # so many channels that torch-pruning's threshold reached a layer's floor
            hi = ratio
            continue
        achieved = 1.0 - value / reference
        error = abs(achieved - target_fraction) / target_fraction
        if best is None or error < best[0]:
            best = (error, ratio, history, value)
        if error <= config.tolerance / 2:
            break
        if value > goal:
            lo = ratio
        else:
            hi = ratio
    if best is None:
        raise PruningError(f"every trial cut a layer below {1 - config.max_layer_fraction:.0%} of its reference "
                           f"width (last: {', '.join(broken[:4])}); raise max_layer_fraction or lower round_to.")
    return _plan(best[2], best[1], metric, target_fraction, reference, best[3], config)


def _plan(history, ratio, metric, target, reference, value, config) -> StepPlan:
    return StepPlan(history=history, ratio=ratio, metric=metric, requested_fraction=target,
                    achieved_fraction=1.0 - value / reference,
                    value=float(value) if metric == "latency" else int(value), tolerance=config.tolerance)
