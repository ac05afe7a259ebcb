"""A latency model of a network on its deployment runtime, for ``plan_step(metric="latency")``. Pure torch.

MACs are a proxy for milliseconds: on this project's CPU a removed MAC buys 0.80-0.97 of its share of the time
(``benchmarks/pruning_speedup.py``), unevenly across layers (:mod:`lightning_segcompress.pruning.latency` has
the findings). This module predicts a network's latency on ``executorch`` (XNNPACK), ``torchscript_lite`` or
``eager`` from timings *on that runtime*:

* every convolution (and linear layer) whose channels pruning can change -- read from the dependency graph, so
  the classifier's output and the image input never vary -- is exported **alone** to the runtime (a one-layer
  module at its real input size; ExecuTorch: ``export_executorch`` + ``ExecuTorchProgram``, lite: the
  ``export_torchscript_lite`` path, eager: plain) and timed on a grid of widths: ``levels`` of its input and of
  its output channels (default 1, 1/2 and 1/4), rounded up to ``round_to`` (a depthwise convolution: of its
  channels); layers under ``fine_macs_share`` of the MACs at the first two levels only. Layers with a negligible
  share of the MACs (squeeze-excitation convs on 1x1 maps) are not timed;
* between grid points the latency is interpolated bilinearly in (input, output) channels, and extrapolated from
  the narrowest cell below it. One bilinear cell is exactly ``a + b*cin + c*cout + d*cin*cout``: a fixed
  overhead, reading the input, writing the output and the compute. Timings are the minimum of ``runs`` runs
  (interference from other processes only ever adds time) and are made monotone in both widths;
* what pruning cannot change, or what is not modelled (untimed layers, NCHW/NHWC transposes at XNNPACK
  partition boundaries, resizes, activations and adds, the classifier's output side) is one constant: the
  whole network measured on the runtime minus the sum of the modelled layers at their widths then;
* two-point calibration (``calibration_ratio``, default 0.3): the whole network is measured a second time with
  every prunable group cut uniformly by that channel ratio (about half the MACs gone, where latency targets
  land), and ``measured = scale * sum + constant`` is solved through both points. ``scale`` corrects what
  isolated timings get systematically wrong in proportion to the layers' work: a layer timed alone pays its own
  input handling and, on ExecuTorch, its own NCHW/NHWC transposes (too much saved per channel), while
  activations, adds and resizes that shrink with the channels are not in any layer (too little). On ExecuTorch
  the first effect dominates: DeepLabV3+(mnv3-L) at 512x512 measured a scale of 0.44 (its 49 layers timed alone
  sum to 452 ms, the whole network takes 229 ms), and with the scale forced to 1 a 2x request achieved 1.13x.
  A scale outside 0.2..5 (timing noise, not a systematic bias) falls back to 1.

Predicted latency = scale * sum over the modelled layers + constant; exact for the two networks measured. It
is cheap to evaluate (no forward pass: it reads the layers' channel counts), so a target search can call it for
every trial. Layer timings are cached per process by (runtime, threads, layer type and configuration, input
shape, widths), so a second model of the same network (or of another one sharing layer shapes) times only
what is new. ``StructuredPruning`` also measures every pruned network once, so predicted and measured ms can be
compared.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from lightning_segcompress.benchmark.runtime_timer import RuntimeTimer
from lightning_segcompress.benchmark.runtimes import runtime_names
from lightning_segcompress.pruning.graph import build_graph
from lightning_segcompress.pruning.importance import ROOT_TYPES, group_layers, is_out_pruning, owner_names
from lightning_segcompress.utils.inspection import copy_without_hooks, output_tensors

RUNTIMES = runtime_names()  # every registered runtime (benchmark.runtimes) can time a layer
DEFAULT_LEVELS = (1.0, 0.5, 0.25)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


# ---- one layer, alone ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """Everything a layer's isolated latency depends on besides its widths (a cache key)."""

    cls: str  # torch.nn class name: Conv2d, ConvTranspose2d, Linear, ...
    in_shape: tuple[int, ...]  # its input in the network; the channel entry is replaced by the width timed
    kernel_size: tuple = ()
    stride: tuple = ()
    padding: Any = ()
    dilation: tuple = ()
    output_padding: tuple = ()
    padding_mode: str = "zeros"
    bias: bool = True

    @classmethod
    def of(cls, module: nn.Module, in_shape: Sequence[int]) -> LayerSpec:
        if isinstance(module, nn.Linear):
            return cls("Linear", tuple(in_shape), bias=module.bias is not None)
        return cls(type(module).__name__ if type(module) in _CONV_CLASSES else _conv_base(module).__name__,
                   tuple(in_shape), tuple(module.kernel_size), tuple(module.stride),
                   module.padding if isinstance(module.padding, str) else tuple(module.padding),
                   tuple(module.dilation),
                   tuple(module.output_padding) if isinstance(module, nn.modules.conv._ConvTransposeNd) else (),
                   module.padding_mode,
                   module.bias is not None)

    def build(self, cin: int, cout: int, groups: int = 1) -> tuple[nn.Module, torch.Tensor]:
        """A fresh layer with ``cin`` inputs and ``cout`` outputs (random weights) and an input for it."""
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays untouched
            torch.manual_seed(0)
            if self.cls == "Linear":
                layer = nn.Linear(cin, cout, bias=self.bias)
                shape = (*self.in_shape[:-1], cin)
            else:
                kwargs = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=groups,
                              bias=self.bias, padding_mode=self.padding_mode)
                if self.output_padding:
                    kwargs["output_padding"] = self.output_padding
                layer = getattr(nn, self.cls)(cin, cout, self.kernel_size, **kwargs)
                shape = (self.in_shape[0], cin, *self.in_shape[2:])
            x = torch.randn(*shape)
        return layer.eval(), x


_CONV_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _conv_base(module: nn.Module) -> type:
    """The torch.nn convolution class a subclass (e.g. timm's ``Conv2dSame``) derives from."""
    for cls in _CONV_CLASSES:
        if isinstance(module, cls):
            return cls
    raise TypeError(f"{type(module).__name__} is not a torch.nn convolution")


def layer_widths(module: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a convolution or linear layer."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    return int(module.in_channels), int(module.out_channels)


# ---- timing on a runtime ---------------------------------------------------------------------------------


class LayerTimer(Protocol):
    """What :func:`build_latency_model` times with; tests inject a deterministic one."""

    runtime: str
    threads: int | None

    def time_layer(self, spec: LayerSpec, cin: int, cout: int, groups: int = 1) -> float: ...

    def time_network(self, network: nn.Module, example: torch.Tensor) -> float: ...


# ---- the model -------------------------------------------------------------------------------------------


@dataclass
class LayerTable:
    """One layer's latency on a grid of widths: ``ms[i][j]`` at ``in_widths[i]`` inputs x ``out_widths[j]``
    outputs (ascending). ``kind``: ``dense``; ``depthwise`` (one axis: its channels, on ``out_widths``);
    ``grouped`` (timed at ``reference`` only, scaled by its MACs)."""

    kind: str
    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]
    reference: list[int]  # [in, out] channels when the model was built

    def predict(self, cin: int, cout: int) -> float:
        if self.kind == "depthwise":
            return _interpolate(self.out_widths, self.ms[0], cout)
        if self.kind == "grouped":
            return self.ms[0][0] * (cin * cout) / max(1, self.reference[0] * self.reference[1])
        return _interpolate(self.in_widths, [_interpolate(self.out_widths, row, cout) for row in self.ms], cin)


@dataclass
class LatencyModel:
    """Predicted latency (ms) of a network on ``runtime`` = ``scale`` * sum of ``layers``' interpolated timings +
    ``constant_ms`` (see the module docstring). Plain data: :meth:`as_dict` / :meth:`from_dict` round-trip through
    JSON."""

    runtime: str
    threads: int | None
    input_shape: list[int]
    layers: dict[str, LayerTable]
    constant_ms: float
    measured_ms: float  # the whole network the model was built on, measured on the runtime
    build_s: float = 0.0
    timings: int = 0  # grid points timed while building (from the process's cache or measured)
    levels: list[float] = field(default_factory=lambda: list(DEFAULT_LEVELS))
    scale: float = 1.0
    calibration: dict | None = None  # the second measured network: ratio, measured_ms, modelled_ms, note

    @property
    def reference_ms(self) -> float:
        """The latency of the network the model was built on (measured, and predicted alike)."""
        return self.measured_ms

    def layer_ms(self, network: nn.Module) -> dict[str, float]:
        """Predicted ms of every modelled layer of ``network`` (the same architecture, any widths)."""
        modules = dict(network.named_modules())
        predicted = {}
        for name, table in self.layers.items():
            module = modules.get(name)
            if module is None:
                raise KeyError(f"the latency model has layer {name!r}, which {type(network).__name__} does not have: "
                               "it was built for another architecture.")
            predicted[name] = table.predict(*layer_widths(module))
        return predicted

    def predict(self, network: nn.Module) -> float:
        return self.constant_ms + self.scale * sum(self.layer_ms(network).values())

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        data = dict(data)
        data["layers"] = {name: LayerTable(**table) for name, table in data["layers"].items()}
        return cls(**data)


def build_latency_model(
    network: nn.Module,
    example: torch.Tensor,
    runtime: str = "executorch",
    *,
    threads: int | None = None,
    ignored_layers: Sequence[str] = (),
    protected_layers: Sequence[str] = (),
    round_to: int | None = 8,
    levels: Sequence[float] = DEFAULT_LEVELS,
    min_macs_share: float = 0.002,
    fine_macs_share: float = 0.02,
    calibration_ratio: float | None = 0.3,
    runs: int = 5,
    warmup: int = 1,
    timer: LayerTimer | None = None,
) -> LatencyModel:
    """Time ``network``'s prunable layers alone on ``runtime`` at ``example``'s size, and the whole network as it
    is and (``calibration_ratio``; ``None``: skip) with every prunable group cut by that channel ratio.

    ``ignored_layers`` (output channels never pruned) and ``protected_layers`` (never touched) are module names as
    in :class:`~lightning_segcompress.pruning.PruningConfig`; they decide which widths can change and so which
    grid points are timed. ``round_to`` rounds the grid's widths like the pruner rounds channel counts. Layers
    below ``min_macs_share`` of the network's convolution MACs stay in the constant; those below
    ``fine_macs_share`` are timed at ``levels[:2]`` only (on ExecuTorch every grid point is an export). ``timer``
    replaces the runtime (a :class:`RuntimeTimer` with ``threads``, ``runs``, ``warmup``). ``network`` is not
    modified.
    """
    start = time.perf_counter()
    timer = timer if timer is not None else RuntimeTimer(runtime, threads, runs=runs, warmup=warmup)
    net = copy_without_hooks(network).cpu().eval()
    example = example.detach().cpu()
    shapes = _layer_shapes(net, example)
    axes = prunable_axes(net, example, ignored_layers, protected_layers)
    modules = dict(net.named_modules())
    macs = {name: _macs(modules[name], *shapes[name]) for name in shapes}
    total = sum(macs.values()) or 1.0
    counted = _Counted(timer)
    tables = {}
    for name, (in_shape, _) in shapes.items():
        can_in, can_out = axes.get(name, (False, False))
        if (can_in or can_out) and macs[name] >= min_macs_share * total:
            grid = levels if macs[name] >= fine_macs_share * total else levels[:2]
            tables[name] = _measure(modules[name], LayerSpec.of(modules[name], in_shape), can_in, can_out, grid,
                                    round_to, counted)
    measured = float(timer.time_network(net, example))
    model = LatencyModel(runtime=timer.runtime, threads=timer.threads, input_shape=list(example.shape), layers=tables,
                         constant_ms=0.0, measured_ms=measured, timings=counted.calls,
                         levels=[float(v) for v in levels])
    modelled = sum(model.layer_ms(net).values())
    model.constant_ms = measured - modelled
    if calibration_ratio and tables:
        _calibrate(model, net, example, modelled, calibration_ratio, ignored_layers, protected_layers, round_to,
                   timer)
    model.build_s = round(time.perf_counter() - start, 2)
    return model


_SCALE_BOUNDS = (0.2, 5.0)


def _calibrate(model: LatencyModel, net: nn.Module, example: torch.Tensor, modelled: float, ratio: float,
               ignored_layers: Sequence[str], protected_layers: Sequence[str], round_to: int | None,
               timer: LayerTimer) -> None:
    """Solve ``measured = scale * modelled + constant`` through the network and a uniformly thinned copy."""
    thinned = uniformly_pruned(net, example, ratio, ignored_layers, protected_layers, round_to)
    thin_measured = float(timer.time_network(thinned, example))
    thin_modelled = sum(model.layer_ms(thinned).values())
    calibration = {"ratio": ratio, "measured_ms": thin_measured, "modelled_ms": thin_modelled}
    scale = (model.measured_ms - thin_measured) / (modelled - thin_modelled) if modelled - thin_modelled > 0 else 0.0
    if _SCALE_BOUNDS[0] <= scale <= _SCALE_BOUNDS[1]:
        model.scale = scale
        model.constant_ms = model.measured_ms - scale * modelled
    else:
        calibration["note"] = f"scale {scale:.3g} outside {_SCALE_BOUNDS}: kept 1 (timing noise?)"
    model.calibration = calibration


def uniformly_pruned(network: nn.Module, example: torch.Tensor, ratio: float, ignored_layers: Sequence[str] = (),
                     protected_layers: Sequence[str] = (), round_to: int | None = None) -> nn.Module:
    """A copy of ``network`` with every prunable group (as ``plan_step`` sees them) cut by the channel ``ratio``."""
    import torch_pruning as tp

    candidate = copy_without_hooks(network)
    for p in candidate.parameters():  # see build_graph: frozen layers must be in the traced graph
        p.requires_grad_(True)
    modules = dict(candidate.named_modules())
    names = owner_names(candidate)
    protected = set(protected_layers)
    magnitude = tp.importance.MagnitudeImportance(p=2)

    def importance(group, **kwargs):
        return None if group_layers(group, names) & protected else magnitude(group, **kwargs)

    pruner = tp.pruner.MetaPruner(candidate, example, importance=importance, global_pruning=False,
                                  pruning_ratio=ratio, ignored_layers=[modules[n] for n in ignored_layers],
                                  round_to=round_to, output_transform=output_tensors, root_module_types=ROOT_TYPES)
    pruner.step()
    return candidate.eval()


class _Counted:
    def __init__(self, timer: LayerTimer) -> None:
        self.timer, self.calls = timer, 0

    def time_layer(self, spec: LayerSpec, cin: int, cout: int, groups: int = 1) -> float:
        self.calls += 1
        return self.timer.time_layer(spec, cin, cout, groups)


def prunable_axes(network: nn.Module, example: torch.Tensor, ignored_layers: Sequence[str] = (),
                  protected_layers: Sequence[str] = ()) -> dict[str, tuple[bool, bool]]:
    """``{layer: (its input channels can be cut, its output channels can be cut)}`` for every layer a prunable
    group reaches (the groups ``plan_step`` scores)."""
    graph = build_graph(network, example)
    names = owner_names(network)
    modules = dict(network.named_modules())
    protected = set(protected_layers)
    axes: dict[str, list[bool]] = {}
    for group in graph.get_all_groups(ignored_layers=[modules[n] for n in ignored_layers],
                                      root_module_types=ROOT_TYPES):
        if group_layers(group, names) & protected:
            continue
        for dep, idxs in group:
            name = names.get(dep.target.module)
            if name is None or not idxs or not isinstance(modules.get(name), _LAYERS):
                continue
            axes.setdefault(name, [False, False])[1 if is_out_pruning(dep) else 0] = True
    return {name: (flags[0], flags[1]) for name, flags in axes.items()}


def width_grid(channels: int, levels: Sequence[float], round_to: int | None) -> list[int]:
    """The widths a layer axis is timed at: ``levels`` of ``channels``, rounded up to ``round_to``, ascending."""
    step = max(1, round_to or 1)
    if channels <= step:
        return [channels]
    return sorted({min(channels, max(step, math.ceil(level * channels / step - 1e-9) * step)) for level in levels}
                  | {channels})


def _measure(module: nn.Module, spec: LayerSpec, can_in: bool, can_out: bool, levels, round_to,
             timer: LayerTimer) -> LayerTable:
    cin, cout = layer_widths(module)
    groups = int(getattr(module, "groups", 1))
    if groups > 1 and groups == cin == cout:
        widths = width_grid(cout, levels, round_to)
        ms = [[float(timer.time_layer(spec, w, w, w)) for w in widths]]
        return LayerTable("depthwise", [cin], widths, _monotone(ms), [cin, cout])
    if groups > 1:
        return LayerTable("grouped", [cin], [cout], [[float(timer.time_layer(spec, cin, cout, groups))]], [cin, cout])
    in_widths = width_grid(cin, levels, round_to) if can_in else [cin]
    out_widths = width_grid(cout, levels, round_to) if can_out else [cout]
    ms = [[float(timer.time_layer(spec, i, o, 1)) for o in out_widths] for i in in_widths]
    return LayerTable("dense", in_widths, out_widths, _monotone(ms), [cin, cout])


def _monotone(ms: list[list[float]]) -> list[list[float]]:
    """No narrower point slower than a wider one: timing noise only adds time, so a narrower layer that measured
    slower takes the wider one's time (walking down from the widest point)."""
    ms = [list(row) for row in ms]
    for i in range(len(ms) - 1, -1, -1):
        for j in range(len(ms[i]) - 1, -1, -1):
            if i + 1 < len(ms):
                ms[i][j] = min(ms[i][j], ms[i + 1][j])
            if j + 1 < len(ms[i]):
                ms[i][j] = min(ms[i][j], ms[i][j + 1])
    return ms


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly beyond both ends, never below 0."""
    if len(xs) == 1:
        return float(ys[0])
    k = 1
    while k < len(xs) - 1 and x > xs[k]:
        k += 1
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return max(0.0, float(y0 + (y1 - y0) * (x - x0) / (x1 - x0)))


def _layer_shapes(network: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape of every convolution and linear layer the forward runs (first call)."""
    shapes: dict[str, tuple] = {}

    def hook(name):
        def record(module, args, output):
            if name not in shapes and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                shapes[name] = (tuple(args[0].shape), tuple(output.shape))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in network.named_modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            network(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _macs(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> float:
    cin, cout = layer_widths(module)
    if isinstance(module, nn.Linear):
        return float(math.prod(out_shape) * cin)
    groups = int(getattr(module, "groups", 1))
    spatial = in_shape if isinstance(module, nn.modules.conv._ConvTransposeNd) else out_shape
    return float(cout * cin // groups * math.prod(module.kernel_size) * math.prod(spatial[2:]) * spatial[0])
