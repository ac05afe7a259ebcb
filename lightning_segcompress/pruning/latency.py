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

An eager per-group profiler (``benchmarks/_eager_group_costs.py``, used by ``benchmarks/pruning_speedup.py``)
measured per pruning group how many milliseconds removing a share of its channels saves per MAC removed. It grew into
:mod:`lightning_segcompress.pruning.latency_model`: a latency model on the deployment runtime (ExecuTorch, lite or
eager) that ``plan_step(metric="latency")`` bisects on. :func:`model_group_costs` reads the per-group savings from
such a model (no further timing), :func:`weights_from_costs` turns them into group weights (a group that saves more
ms per MAC than average gets a weight below 1), and :class:`KeepBest` gives every group a width floor so that such
weights cut a group down instead of making torch-pruning skip it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

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
    """Group weights from measured or modelled savings: ``(average ms per MAC / the group's ms per MAC) **
    strength``, clipped to ``bounds``; groups whose removal saves no time get ``bounds[1]``."""
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


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return max(total, 1)




def _conv_macs(conv: nn.modules.conv._ConvNd, io: _IO, cin: int, cout: int, groups: int) -> float:
    return float(cout * (cin // groups) * _numel(conv.kernel_size) * _numel(io.output[2:]) * io.output[0])


