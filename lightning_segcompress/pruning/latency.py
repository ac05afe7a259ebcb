"""Latency-aware pruning helpers for :func:`~lightning_segcompress.pruning.plan_step`. Pure torch.

What MACs miss on a CPU (x86 AVX-512, 1x3x512x512, smp Unet-R18 and DeepLabV3+(MobileNetV3-L), random init;
numbers from ``benchmarks/pruning_speedup.py`` and from per-layer profiles taken while writing it):

* Channel counts off the 16-grid (an AVX-512 register holds 16 fp32; oneDNN blocks channels by 16, XNNPACK
  pads output channels to 16-wide tiles) run slow: eager 3x3 conv 40->40 at 128x128 took 3.9 ms, 48->48 3.4 ms;
  the 19-class head 16->19 at 512x512 took 26.9 ms vs 10.6 ms for 16->16. Pruning with ``round_to=16``
  instead of 8 alone raised Unet's ExecuTorch efficiency from 0.85 to 0.94 (DeepLabV3+: 0.80 to 0.85).
* Thin layers at full resolution cost more per MAC: eager 32->16 at 512x512 took 41 ms vs 10.6 ms for
  16->16 (2x the MACs, 3.9x the time). Unet's ``decoder.blocks.3/4`` and DeepLabV3+'s high-resolution
  depthwise blocks and 128x128 decoder separable conv are where a MAC removed buys the most time.
* Costs pruning cannot touch (ExecuTorch ETDump profile of Unet, 1 thread, 474 ms): transposes between
  NCHW and XNNPACK's NHWC at each of the 6 partition boundaries (32 ms), the non-delegated
  ``upsample_nearest2d`` (33 ms, portable kernel), the 19-class head (21 ms for 0.72 GMACs where other
  0.6-GMAC 3x3 convs take 11 ms) and the 7x7 stem (11.7 ms at 64 and at 40 outputs). DeepLabV3+ (112 ms): the
  final 512x512 transpose and bilinear resizes (8 ms). These shrink the speedup as pruning deepens.
* Convolutions themselves scale close to their MACs in XNNPACK; masks (zeroed weights, same shapes) buy
  nothing on either runtime.

:func:`latency_group_weights` measures per pruning group how many milliseconds removing a share of its
channels saves (every convolution of the group timed alone at its real input size, full and narrowed; its
other layers and the element-wise ops it flows through scaled by their share of channels) per MAC removed.
Groups that save more time per MAC than average get a weight below 1 (cheaper to remove), groups whose
latency does not shrink a weight above 1. :class:`KeepBest` gives every group a width floor so that such
weights cut a group down instead of making torch-pruning skip it.

The eager per-layer timing of that experiment grew into :mod:`lightning_segcompress.pruning.latency_model`: a
latency model on the deployment runtime (ExecuTorch, lite or eager) that ``plan_step(metric="latency")``
bisects on. :func:`model_group_costs` reads the same per-group savings from such a model (no further timing),
so :func:`weights_from_costs` can rank channels by what they cost *on the runtime*.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_segcompress.benchmark.timing import num_threads
from lightning_segcompress.pruning.graph import build_graph
from lightning_segcompress.pruning.importance import ROOT_TYPES, group_key, is_out_pruning
from lightning_segcompress.pruning.latency_model import LatencyModel, _layer_shapes, layer_widths


@dataclass(frozen=True)
class GroupCost:
    """What removing ``removed`` of a group's ``channels`` saves, from isolated per-layer timings."""

    channels: int
    removed: int
    saved_ms: float
    saved_macs: float

    @property
    def ms_per_gmac(self) -> float:
        return self.saved_ms / (self.saved_macs / 1e9) if self.saved_macs > 0 else float("inf")


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


class KeepBest:
    """Wraps an importance so that every group keeps its ``keep_fraction`` (at least ``min_channels``) best
    channels: they score far above any threshold a sane pruning ratio reaches.

    torch-pruning's global ranking caps nothing per group: when every channel of a group falls under the
    threshold it skips the group (a layer cannot be emptied) and leaves it *unpruned*. With group weights that
    lower a whole group below the others (random-init l2 scores are within about +-5% of each group's mean) the
    MACs search then turns non-monotonic and misses its target. With this floor such a group is cut to its
    floor instead, which is what the weight asked for.
    """

    def __init__(self, importance: Callable, keep_fraction: float = 0.25, min_channels: int = 16) -> None:
        self.importance = importance
        self.keep_fraction = keep_fraction
        self.min_channels = min_channels

    def __call__(self, group, **kwargs) -> torch.Tensor | None:
        imp = self.importance(group, **kwargs)
        if imp is None:
            return None
        imp = imp.detach().double().cpu().clone()
        keep = min(len(imp), max(self.min_channels, math.ceil(self.keep_fraction * len(imp))))
        best = torch.topk(imp, keep).indices
        imp[best] += 1000.0 * float(imp.abs().max()) + 1.0
        return imp


def weights_from_costs(
    costs: dict[str, GroupCost], strength: float = 1.0, bounds: tuple[float, float] = (0.5, 2.0)
) -> dict[str, float]:
    """Turn measured savings into group weights (see :func:`latency_group_weights`)."""
    low, high = bounds
    total_ms = sum(max(c.saved_ms, 0.0) for c in costs.values())
    total_macs = sum(c.saved_macs for c in costs.values())
    if total_ms <= 0 or total_macs <= 0:
        return dict.fromkeys(costs, 1.0)
    average = total_ms / total_macs
    weights = {}
    for key, cost in costs.items():
        if cost.saved_ms <= 0:
            weights[key] = high
        elif cost.saved_macs <= 0:
            weights[key] = low
        else:
            ratio = average / (cost.saved_ms / cost.saved_macs)
            weights[key] = float(min(high, max(low, ratio**strength)))
    return weights


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


def model_group_costs(
    model: LatencyModel,
    network: nn.Module,
    example: torch.Tensor,
    ignored_layers: Sequence[str] = (),
    *,
    fraction: float = 0.5,
    round_to: int | None = 16,
) -> dict[str, GroupCost]:
    """Per prunable group (keys as in ``compute_group_scores``): the ms ``model`` predicts removing ``fraction`` of
    its channels saves on the model's runtime, and the MACs it saves. Layers outside the model (its constant)
    save MACs but no time. ``network`` is not modified; nothing is timed."""
    was_training = network.training
    network.eval()
    try:
        shapes = {name: _IO(*io) for name, io in _layer_shapes(network, example).items()}
        graph = build_graph(network, example)
    finally:
        network.train(was_training)
    names = {m: n for n, m in network.named_modules()}
    modules = dict(network.named_modules())
    removal = _removal(fraction, round_to)
    costs = {}
    for group in graph.get_all_groups(ignored_layers=[modules[n] for n in ignored_layers],
                                      root_module_types=ROOT_TYPES):
        channels = len(group[0].idxs)
        removed = removal(channels)
        if removed < 1:
            continue
        saved_ms = saved_macs = 0.0
        seen: set[str] = set()
        for dep, idxs in group:
            name = names.get(dep.target.module)
            module = modules.get(name) if name is not None else None
            if name in seen or name not in shapes or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            seen.add(name)  # a depthwise conv appears twice (in and out): count it once
            cin, cout = layer_widths(module)
            groups = int(getattr(module, "groups", 1))
            n = max(1, round(removed * len(idxs) / channels))
            if groups > 1 and groups == cin == cout:
                new_in = new_out = new_groups = max(1, cin - n)
            elif is_out_pruning(dep):
                new_in, new_out, new_groups = cin, max(1, cout - n), groups
            else:
                new_in, new_out, new_groups = max(1, cin - n), cout, groups
            table = model.layers.get(name)
            if table is not None:
                saved_ms += model.scale * (table.predict(cin, cout) - table.predict(new_in, new_out))
            if isinstance(module, nn.Linear):
                rows = _numel(shapes[name].output) // max(1, cout)
                saved_macs += float(rows * (cin * cout - new_in * new_out))
            else:
                saved_macs += (_conv_macs(module, shapes[name], cin, cout, groups)
                               - _conv_macs(module, shapes[name], new_in, new_out, new_groups))
        costs[group_key(group, names)] = GroupCost(channels=channels, removed=removed, saved_ms=saved_ms,
                                                   saved_macs=saved_macs)
    return costs


@dataclass(frozen=True)
class _IO:
    input: tuple[int, ...]
    output: tuple[int, ...]


def _removal(fraction: float, round_to: int | None) -> Callable[[int], int]:
    """How many of a group's channels to remove when measuring its saving: ``fraction``, in steps of
    ``round_to`` where the group is wider than one step, and never all of them."""

    def removed(channels: int) -> int:
        count = max(1, round(fraction * channels))
        if round_to and channels > round_to:
            count = max(round_to, count - count % round_to)
        return min(count, channels - 1)

    return removed


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


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return max(total, 1)


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


_TIMED_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


def _conv_macs(conv: nn.modules.conv._ConvNd, io: _IO, cin: int, cout: int, groups: int) -> float:
    return float(cout * (cin // groups) * _numel(conv.kernel_size) * _numel(io.output[2:]) * io.output[0])


def _linear_saving(linear: nn.Linear, io: _IO, n: int, is_out: bool, hooked_ms: float) -> tuple[float, float]:
    rows = _numel(io.output) // max(1, linear.out_features)
    share = n / (linear.out_features if is_out else linear.in_features)
    return hooked_ms * share, float(rows * linear.in_features * linear.out_features) * share
