"""Per-layer floors: the most of one layer's channels pruning may remove, counted from its reference width.

torch-pruning's own ``max_pruning_ratio`` is relative to the network a pruner is given (the one before this
step), so an AGP schedule compounds it. A group can couple several layers (a ``torch.cat`` joins the channels of
DeepLabV3+'s ASPP output and its high-resolution branch into one group rooted at the next convolution), so the
floor is kept for every layer whose output channels the group cuts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch_pruning as tp
from torch import nn

from lightning_segcompress.pruning.graph import layer_widths
from lightning_segcompress.pruning.importance import ROOT_TYPES, group_key, is_out_pruning, owner_names


def floor_width(reference_width: int, max_layer_fraction: float, round_to: int | None) -> int:
    """Channels a layer keeps at least: ``1 - max_layer_fraction`` of its reference width, >= 1, rounded up."""
    floor = max(1, math.ceil((1.0 - max_layer_fraction) * reference_width - 1e-9))
    return math.ceil(floor / round_to) * round_to if round_to else floor


def member_positions(graph: tp.DependencyGraph, group, names: dict, layers: Iterable[str]) -> dict[str, list[int]]:
    """``{layer: positions in the group's score vector that are that layer's output channels}``.

    Most groups cut every member at the same indices. Where members have fewer channels than the root (a
    concatenation), each root channel is followed through the graph on its own to see which member it cuts."""
    layers = set(layers)
    members = [(names.get(dep.target.module), len(idxs)) for dep, idxs in group
               if is_out_pruning(dep) and names.get(dep.target.module) in layers]
    size = len(group[0].idxs)
    if all(length == size for _, length in members):
        return {name: list(range(size)) for name, _ in members}
    root = group[0].dep
    positions = defaultdict(set)
    for position, index in enumerate(group[0].idxs):
        for dep, idxs in graph.get_pruning_group(root.target.module, root.handler, idxs=[int(index)]):
            name = names.get(dep.target.module)
            if idxs and is_out_pruning(dep) and name in layers:
                positions[name].add(position)
    return {name: sorted(p) for name, p in positions.items()}


def layer_floors(graph: tp.DependencyGraph, scores: dict[str, list[float]], ignored_modules: Iterable[nn.Module],
                 max_layer_fraction: float, round_to: int | None,
                 reference_widths: dict[str, int] | None = None) -> dict[str, tuple[int, tuple[str, list[int]]]]:
    """``{layer: (channels it must keep, (group key, its positions in that group's scores))}`` for every layer
    a scored group cuts. A layer missing from ``reference_widths`` counts from its current width."""
    names = owner_names(graph.model)
    widths = layer_widths(graph.model)
    reference = reference_widths or {}
    floors = {}
    for group in graph.get_all_groups(ignored_layers=list(ignored_modules), root_module_types=ROOT_TYPES):
        key = group_key(group, names)
        if key not in scores:
            continue
        for name, positions in member_positions(graph, group, names, widths).items():
            kept = min(len(positions), floor_width(reference.get(name, widths[name]), max_layer_fraction, round_to))
            floors[name] = (kept, (key, positions))
    return floors


def protect_floors(scores: dict[str, list[float]], floors: dict, round_to: int | None = None) -> dict[str, list[float]]:
    """Raise the best ``kept`` channels of every floored layer above every other score, so that a global
    threshold reaches them only after every unprotected channel (the plan then sees the floor broken).

    torch-pruning rounds the channels a group keeps *down* to ``round_to``, which would take protected channels
    when their count is not a multiple of it: so each group protects a multiple of ``round_to`` (its best
    remaining channels make up the difference) or all of its channels."""
    if not floors:
        return scores
    lift = 2.0 * max(abs(v) for values in scores.values() for v in values) + 1.0
    protected = {key: list(values) for key, values in scores.items()}
    lifted = defaultdict(set)
    for kept, (key, positions) in floors.values():
        values = scores[key]
        lifted[key].update(sorted(positions, key=values.__getitem__, reverse=True)[:kept])
    for key, positions in lifted.items():
        values = scores[key]
        if round_to:
            wanted = min(len(values), math.ceil(len(positions) / round_to) * round_to)
            rest = sorted((p for p in range(len(values)) if p not in positions), key=values.__getitem__, reverse=True)
            positions.update(rest[:wanted - len(positions)])
        for position in positions:
            protected[key][position] += lift
    return protected
