"""Eager per-layer profiling of pruning groups, for ``benchmarks/pruning_speedup.py``'s latency-aware row (not part
of the package: the package plans latency with the runtime's latency model, ``pruning/latency_model.py``).

:func:`latency_group_weights` measures per pruning group how many milliseconds removing a share of its channels saves
in eager PyTorch (every convolution of the group timed alone at its real input size, full and narrowed; its other
layers and the element-wise ops it flows through scaled by their share of channels) per MAC removed. Groups that save
more time per MAC than average get a weight below 1 (cheaper to remove), groups whose latency does not shrink a weight
above 1; plan with ``KeepBest(importance)`` so such weights cut a group down instead of making torch-pruning skip it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_segcompress.benchmark.timing import num_threads
from lightning_segcompress.pruning.graph import build_graph
from lightning_segcompress.pruning.importance import ROOT_TYPES, group_key, is_out_pruning
from lightning_segcompress.pruning.latency import (
    _IO,
    GroupCost,
    _conv_macs,
    _numel,
    _removal,
    weights_from_costs,
)

_TIMED_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def latency_group_weights(
    network: nn.Module,
    example: torch.Tensor,
    ignored_layers: Sequence[str] = (),
    *,
    threads: int | None = None,
    runs: int = 3,
    fraction: float = 0.5,
    round_to: int | None = 16,
    strength: float = 1.0,
    bounds: tuple[float, float] = (0.5, 2.0),
) -> dict[str, float]:
    """``{group_key: weight}`` for ``plan_step(..., group_weights=...)``: ``(average ms per MAC / the group's
    ms per MAC) ** strength``, clipped to ``bounds``. Groups whose removal saves no time get ``bounds[1]``.

    Timings are the minimum of ``runs`` eager runs on ``threads`` threads (use the deployment's thread count).
    The saving is measured by removing ``fraction`` of a group's channels, rounded to ``round_to`` (use the
    pruner's ``round_to``), i.e. the slope over the range a 50% cut actually uses. ``network`` is not modified.

    Plan with ``KeepBest(importance)``: torch-pruning leaves a group *untouched* when the global threshold would
    remove all of its channels, so without a floor a group weighted below the others is skipped, not pruned,
    and ``plan_step`` misses its MACs target (seen on Unet-R18 at random init with weights as close as +-3%).
    """
    costs = group_costs(network, example, ignored_layers, threads=threads, runs=runs, fraction=fraction,
                        round_to=round_to)
    return weights_from_costs(costs, strength, bounds)


def group_costs(
    network: nn.Module,
    example: torch.Tensor,
    ignored_layers: Sequence[str] = (),
    *,
    threads: int | None = None,
    runs: int = 3,
    fraction: float = 0.5,
    round_to: int | None = 16,
) -> dict[str, GroupCost]:
    """Per prunable group (keys as in ``compute_group_scores``): time and MACs saved by removing ``fraction``
    of its channels."""
    was_training = network.training
    network.eval()
    try:
        with num_threads(threads):
            shapes, module_ms = _profile_modules(network, example, runs)
            graph = build_graph(network, example)
            names = {m: n for n, m in network.named_modules()}
            modules = dict(network.named_modules())
            timer = _ConvTimer(runs)
            elem_ms = _elementwise_ms_per_value(network, shapes, module_ms)
            costs = {}
            for group in graph.get_all_groups(ignored_layers=[modules[n] for n in ignored_layers],
                                              root_module_types=ROOT_TYPES):
                cost = _group_cost(group, names, shapes, module_ms, elem_ms, timer, _removal(fraction, round_to))
                if cost is not None:
                    costs[group_key(group, names)] = cost
            return costs
    finally:
        network.train(was_training)


def _profile_modules(network: nn.Module, example: torch.Tensor, runs: int) -> tuple[dict, dict]:
    """Input/output shapes and wall time (min over runs, children included) of every named module."""
    shapes: dict[str, _IO] = {}
    times: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    handles = []

    def before(name):
        def hook(module, args):
            starts[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, args, output):
            elapsed = (time.perf_counter() - starts[name]) * 1000.0
            times.setdefault(name, []).append(elapsed)
            if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                shapes[name] = _IO(tuple(args[0].shape), tuple(output.shape))
        return hook

    for name, module in network.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name)))
    try:
        with torch.no_grad():
            network(example)  # warm-up
            times.clear()
            for _ in range(max(1, runs)):
                network(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes, {name: min(values) for name, values in times.items()}


def _elementwise_ms_per_value(network: nn.Module, shapes: dict[str, _IO], module_ms: dict[str, float]) -> float:
    """Typical cost of one output value of a memory-bound layer (the normalisations), to price the element-wise
    ops outside modules (activations, adds, upsampling, concatenation) that a group's channels flow through."""
    rates = [module_ms[name] / _numel(shapes[name].output) for name, module in network.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and name in shapes and name in module_ms]
    return statistics.median(rates) if rates else 0.0


class _ConvTimer:
    """Times a convolution alone (random weights and input) at a given configuration; results are cached."""

    def __init__(self, runs: int) -> None:
        self.runs = max(1, runs)
        self.cache: dict[tuple, float] = {}

    def __call__(self, conv: nn.modules.conv._ConvNd, in_shape: tuple[int, ...], cin: int, cout: int,
                 groups: int) -> float:
        key = (type(conv), tuple(in_shape[2:]), cin, cout, groups, conv.kernel_size, conv.stride, conv.padding,
               conv.dilation, conv.bias is not None)
        if key not in self.cache:
            self.cache[key] = self._time(conv, in_shape, cin, cout, groups)
        return self.cache[key]

    def _time(self, conv, in_shape, cin, cout, groups) -> float:
        layer = type(conv)(cin, cout, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                           dilation=conv.dilation, groups=groups, bias=conv.bias is not None).eval()
        x = torch.randn(in_shape[0], cin, *in_shape[2:])
        best = float("inf")
        with torch.no_grad():
            layer(x)
            for _ in range(self.runs):
                start = time.perf_counter()
                layer(x)
                best = min(best, (time.perf_counter() - start) * 1000.0)
        return best


def _group_cost(group, names: dict, shapes: dict[str, _IO], module_ms: dict[str, float], elem_ms: float,
                timer: _ConvTimer, removal: Callable[[int], int]) -> GroupCost | None:
    channels = len(group[0].idxs)
    removed = removal(channels)
    if removed < 1:
        return None
    root_io = shapes.get(names.get(group[0].dep.target.module, ""))
    saved_ms = saved_macs = 0.0
    seen: set[str] = set()
    for dep, idxs in group:
        module = dep.target.module
        name = names.get(module)
        n = max(1, round(removed * len(idxs) / channels))  # channels this layer loses
        is_out = is_out_pruning(dep)
        if name is None:  # an op outside modules (activation, add, upsample, concat): priced per value moved
            if root_io is not None:
                saved_ms += elem_ms * n * _numel(root_io.output[2:])
            continue
        if name in seen or name not in shapes:
            continue
        if isinstance(module, _TIMED_CONVS):
            seen.add(name)  # a depthwise conv appears twice (in and out): count it once
            ms, macs = _conv_saving(module, shapes[name], n, is_out, module_ms.get(name, 0.0), timer)
        elif isinstance(module, nn.Linear):
            ms, macs = _linear_saving(module, shapes[name], n, is_out, module_ms.get(name, 0.0))
        else:  # normalisation and other per-channel layers: cost proportional to their channels
            ms, macs = module_ms.get(name, 0.0) * n / max(1, shapes[name].output[1]), 0.0
        saved_ms += ms
        saved_macs += macs
    return GroupCost(channels=channels, removed=removed, saved_ms=saved_ms, saved_macs=saved_macs)


def _conv_saving(conv: nn.modules.conv._ConvNd, io: _IO, n: int, is_out: bool, hooked_ms: float,
                 timer: _ConvTimer) -> tuple[float, float]:
    cin, cout, groups = conv.in_channels, conv.out_channels, conv.groups
    depthwise = groups > 1 and groups == cin == cout
    if depthwise:
        new_in = new_out = new_groups = max(1, cin - n)
    elif groups > 1:  # a grouped conv keeps its group count: no isolated timing, scale the measured time
        share = n / (cout if is_out else cin)
        return hooked_ms * share, _conv_macs(conv, io, cin, cout, groups) * share
    else:
        new_in, new_out, new_groups = (cin, max(1, cout - n), 1) if is_out else (max(1, cin - n), cout, 1)
    saved_ms = timer(conv, io.input, cin, cout, groups) - timer(conv, io.input, new_in, new_out, new_groups)
    saved_macs = _conv_macs(conv, io, cin, cout, groups) - _conv_macs(conv, io, new_in, new_out, new_groups)
    return saved_ms, saved_macs


def _linear_saving(linear: nn.Linear, io: _IO, n: int, is_out: bool, hooked_ms: float) -> tuple[float, float]:
    rows = _numel(io.output) // max(1, linear.out_features)
    share = n / (linear.out_features if is_out else linear.in_features)
    return hooked_ms * share, float(rows * linear.in_features * linear.out_features) * share
