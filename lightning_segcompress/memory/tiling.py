"""Exact tiled inference: run a network's high-resolution, fully-convolutional prefix tile by tile, stitch the
prefix's outputs, and run the rest of the network on them as usual.

Each tile of a prefix output needs a larger region of every tensor before it: walking back through a
convolution or pooling window, ``in = [out0 * stride - pad, (out1 - 1) * stride - pad + dilation * (k - 1) + 1)``.
Regions are propagated backwards through the traced graph (the union over a tensor's readers), each op is run
on its region with ``padding=0`` after padding only the part of the window that lies outside the real map —
with zeros (convolutions, average pooling) or -inf (max pooling) — so every tile equals the same region of
untiled inference. The prefix ends before the first op that is not local (global pooling, SE squeeze,
resampling, reshapes).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function
from torch.utils._pytree import tree_unflatten

from lightning_segcompress.memory.trace import depends_on_input, export_graph, module_path, module_paths

aten = torch.ops.aten

Region = tuple[int, int, int, int]  # rows [y0, y1), columns [x0, x1)


class TilingError(ValueError):
    """Tiling as requested cannot reproduce untiled inference exactly."""


def _ops(*names: str) -> set:
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            found.add(getattr(op, overload or "default"))
    return found


POINTWISE = _ops(
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
    "sigmoid", "sigmoid_", "silu", "silu_", "gelu", "leaky_relu", "leaky_relu_", "elu", "elu_", "tanh",
    "clamp", "clamp_", "clone", "alias", "detach", "add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor",
    "mul.Tensor", "mul_.Tensor", "div.Tensor", "div_.Tensor", "add.Scalar", "mul.Scalar",
    "batch_norm", "dropout", "contiguous",
)
CONCAT = _ops("cat")
CONVOLUTION = _ops("conv2d")
MAX_POOL = _ops("max_pool2d")
AVG_POOL = _ops("avg_pool2d")
WINDOWED = CONVOLUTION | MAX_POOL | AVG_POOL


@dataclass(frozen=True)
class _Window:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pad_value: float

    def needed(self, region: Region) -> Region:
        y0, y1, x0, x1 = region
        ry = self._axis(y0, y1, 0)
        rx = self._axis(x0, x1, 1)
        return (*ry, *rx)

    def _axis(self, start: int, stop: int, axis: int) -> tuple[int, int]:
        s, p, d, k = self.stride[axis], self.padding[axis], self.dilation[axis], self.kernel[axis]
        return start * s - p, (stop - 1) * s - p + d * (k - 1) + 1


@dataclass(frozen=True)
class TilingPlan:
    """What :class:`TiledInference` runs: the prefix steps, the outputs it stitches, and per tile the region of
    every prefix tensor."""

    prefix: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]
    tiles: tuple[dict[fx.Node, Region], ...]
    output_tiles: tuple[dict[fx.Node, Region], ...]
    stop: str
    grid: tuple[int, int]
    prefix_macs: int
    tiled_prefix_macs: int

    @property
    def macs_ratio(self) -> float:
        return self.tiled_prefix_macs / self.prefix_macs if self.prefix_macs else 1.0

    def describe(self) -> str:
        last = module_path(self.prefix[-1]) or self.prefix[-1].name
        outs = ", ".join(f"{n.name} {list(n.meta['val'].shape)}" for n in self.outputs)
        return (f"{self.grid[0]}x{self.grid[1]} tiles over {len(self.prefix)} prefix ops (last in `{last}`), "
                f"{self.stop}; stitched outputs: {outs}; prefix convolution MACs x{self.macs_ratio:.2f} "
                "(halo recomputation)")


def _spatial(node: fx.Node) -> tuple[int, int]:
    shape = node.meta["val"].shape
    return int(shape[-2]), int(shape[-1])


def _pair(value, default: int) -> tuple[int, int]:
    if value is None or (isinstance(value, Sequence) and len(value) == 0):
        return default, default
    if isinstance(value, int):
        return value, value
    return (int(value[0]), int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


def _arguments(node: fx.Node) -> dict:
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise TilingError(f"cannot read the arguments of {node.target}")
    return dict(normalized.kwargs)


def _window(node: fx.Node) -> _Window:
    kw = _arguments(node)
    if node.target in CONVOLUTION:
        weight = kw["weight"].meta["val"]
        kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
        return _Window(kernel, _pair(kw.get("stride"), 1), _pair(kw.get("padding"), 0), _pair(kw.get("dilation"), 1),
                       0.0)
    kernel = _pair(kw["kernel_size"], 1)
    stride = _pair(kw.get("stride"), 0)
    stride = kernel if stride == (0, 0) else stride
    dilation = _pair(kw.get("dilation"), 1) if node.target in MAX_POOL else (1, 1)
    return _Window(kernel, stride, _pair(kw.get("padding"), 0), dilation,
                   -math.inf if node.target in MAX_POOL else 0.0)


def why_not_tileable(node: fx.Node, dependent: set[fx.Node]) -> str | None:
    """None where ``node`` is local (each output pixel reads a bounded neighbourhood) and can run on regions;
    otherwise the reason."""
    if node.op == "placeholder":
        return None if _is_map(node) else f"input {list(node.meta['val'].shape)} is not an NCHW image"
    if node.op != "call_function":
        return f"{node.op} {node.target}"
    if node.target is operator.getitem:
        return "tuple output"
    if not _is_map(node):
        return f"{node.target} produces {_shape(node)}, not a feature map"
    inputs = [a for a in node.all_input_nodes if a in dependent]
    if node.target in CONCAT:
        kw = _arguments(node)
        if kw.get("dim", 0) not in (1, -3):
            return "concatenation along a spatial axis"
    elif node.target in WINDOWED:
        kw = _arguments(node)
        if kw.get("ceil_mode") and not _floor_size_matches(node):
            return "pooling with ceil_mode whose output is larger than the floor formula"
        if node.target in AVG_POOL and not kw.get("count_include_pad", True) and any(_pair(kw.get("padding"), 0)):
            return "average pooling that excludes padding from the count"
        if node.target in CONVOLUTION and isinstance(kw.get("padding"), str):
            return "string padding"
        if any(a is not kw.get("input", kw.get("self")) for a in inputs):
            return "weights computed from the input"
    elif node.target in POINTWISE:
        if node.target in _ops("batch_norm") and _arguments(node).get("training"):
            return "batch norm in training mode"
        if node.target in _ops("dropout") and _arguments(node).get("train"):
            return "dropout in training mode"
        out = _spatial(node)
        for arg in node.all_input_nodes:
            if arg in dependent and (not _is_map(arg) or _spatial(arg) != out):
                return f"broadcasts {arg.name} {_shape(arg)} over the map (a global value)"
            if arg not in dependent and isinstance(arg.meta.get("val"), torch.Tensor):
                value = arg.meta["val"]
                if any(int(s) != 1 for s in value.shape[-2:]) and value.dim() >= 2:
                    return f"reads a constant {list(value.shape)} that varies over the map"
    else:
        return f"{node.target} is not a local op (global pooling, resampling or reshaping)"
    return None


def _is_map(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()


def _shape(node: fx.Node):
    value = node.meta.get("val")
    return list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _floor_size_matches(node: fx.Node) -> bool:
    window = _window(node)
    source = _arguments(node).get("self", node.args[0])
    size_in, size_out = _spatial(source), _spatial(node)
    for axis in (0, 1):
        k, s, p, d = window.kernel[axis], window.stride[axis], window.padding[axis], window.dilation[axis]
        if (size_in[axis] + 2 * p - d * (k - 1) - 1) // s + 1 != size_out[axis]:
            return False
    return True


def find_prefix(graph: fx.Graph, split_after: str | None = None) -> tuple[list[fx.Node], str]:
    """The tileable prefix (input-dependent nodes in execution order) and why it stops.

    Without ``split_after`` it runs up to the first op that is not local. With a module name (as in
    ``named_modules``), it ends after the last op of that module, and every op up to there must be local.
    """
    dependent = depends_on_input(graph)
    steps = [n for n in graph.nodes if n in dependent]
    prefix: list[fx.Node] = []
    stop = "ends at the network output"
    if split_after is not None:
        # A wrapper (LogitsOnly, a LightningModule) prefixes the user's module names: match the name's tail.
        owned = [i for i, n in enumerate(steps)
                 if any(p == split_after or p.endswith("." + split_after) for p in module_paths(n))]
        if not owned:
            names = sorted({p for n in steps for p in module_paths(n) if p})
            near = [p for p in names if split_after.split(".")[-1] in p][:8] or names[:8]
            raise TilingError(f"split_after={split_after!r} names no module the network runs; module names look "
                              f"like {near}.")
        last = owned[-1]
        for node in steps[: last + 1]:
            reason = why_not_tileable(node, dependent)
            if reason is not None:
                raise TilingError(
                    f"Cannot tile up to {split_after!r}: {node.name} in `{module_path(node) or '<top>'}` is not local "
                    f"({reason}), so tiles would differ from untiled inference. End the tiled prefix before "
                    "it (split_after=<an earlier module>) or leave split_after unset to stop there automatically."
                )
        prefix = steps[: last + 1]
        stop = f"ends after `{split_after}` (split_after)"
    else:
        for node in steps:
            reason = why_not_tileable(node, dependent)
            if reason is not None:
                stop = f"stops before {node.name} in `{module_path(node) or '<top>'}`: {reason}"
                break
            prefix.append(node)
    if not any(n.op == "call_function" for n in prefix):
        raise TilingError(f"Nothing to tile: the network's first op is not local ({stop}).")
    return prefix, stop


def _tile_bounds(size: int, parts: int) -> list[int]:
    return [round(i * size / parts) for i in range(parts + 1)]


def plan_tiles(graph: fx.Graph, grid: tuple[int, int], split_after: str | None = None) -> TilingPlan:
    """Find the prefix and, for each tile, the region of every prefix tensor needed to compute that tile of every
    tensor the rest of the network reads."""
    prefix, stop = find_prefix(graph, split_after)
    in_prefix = set(prefix)
    outputs = [n for n in prefix if n.op != "placeholder" and any(u not in in_prefix for u in n.users)]
    for node in outputs:
        h, w = _spatial(node)
        if h < grid[0] or w < grid[1]:
            raise TilingError(f"A {grid[0]}x{grid[1]} grid is finer than the prefix output {node.name} "
                              f"({h}x{w}); use a coarser grid or a shorter prefix (split_after).")
    windows = {n: _window(n) for n in prefix if n.target in WINDOWED}
    tiles, output_tiles = [], []
    tiled_macs = 0
    for i in range(grid[0]):
        for j in range(grid[1]):
            wanted: dict[fx.Node, Region] = {}
            for node in outputs:
                ys, xs = _tile_bounds(_spatial(node)[0], grid[0]), _tile_bounds(_spatial(node)[1], grid[1])
                wanted[node] = (ys[i], ys[i + 1], xs[j], xs[j + 1])
            regions = dict(wanted)
            for node in reversed(prefix):
                region = regions.get(node)
                if region is None or node.op == "placeholder":
                    continue
                for arg in node.all_input_nodes:
                    if arg not in in_prefix:
                        continue
                    need = _clip(windows[node].needed(region), _spatial(arg)) if node in windows else region
                    regions[arg] = _union(regions.get(arg), need)
            tiles.append(regions)
            output_tiles.append(wanted)
            tiled_macs += sum(_conv_macs(n, regions[n]) for n in windows if n.target in CONVOLUTION and n in regions)
    full_macs = sum(_conv_macs(n, (0, *_spatial(n)[:1], 0, _spatial(n)[1])) for n in windows if n.target in CONVOLUTION)
    return TilingPlan(tuple(prefix), tuple(outputs), tuple(tiles), tuple(output_tiles), stop, grid, full_macs,
                      tiled_macs)


def _clip(region: Region, size: tuple[int, int]) -> Region:
    y0, y1, x0, x1 = region
    return max(y0, 0), min(y1, size[0]), max(x0, 0), min(x1, size[1])


def _union(a: Region | None, b: Region) -> Region:
    if a is None:
        return b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def _conv_macs(node: fx.Node, region: Region) -> int:
    weight = _arguments(node)["weight"].meta["val"]
    return (region[1] - region[0]) * (region[3] - region[2]) * weight.numel()


def _crop(value: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    if have == want:
        return value
    return value[:, :, want[0] - have[0]: want[1] - have[0], want[2] - have[2]: want[3] - have[2]]


class TiledInference(nn.Module):
    """Run ``network`` on ``input_shape`` inputs with its fully-convolutional prefix computed tile by tile.

    The output equals ``network(x)`` (to float rounding: exact arithmetic, different kernel blocking). The wrapper
    holds a traced copy of the network for one input shape, in eval mode: build it after training. It traces and
    exports (TorchScript, torch.export) like any module.

    Args:
        network: the segmentation network (any module torch.export can trace).
        input_shape: ``[N, C, H, W]`` the tiled program is built for.
        grid: ``[rows, columns]`` of tiles.
        split_after: end the tiled prefix after this module (a name from ``named_modules``); default: just before
            the first op that is not local.

    Example::

        tiled = TiledInference(model, [1, 3, 1024, 2048], grid=[4, 4])
        torch.testing.assert_close(tiled(x), model(x), atol=1e-4, rtol=0)
    """

    def __init__(self, network: nn.Module, input_shape: Sequence[int], grid: Sequence[int] = (2, 2),
                 split_after: str | None = None) -> None:
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or min(grid) < 1:
            raise TilingError(f"grid must be [rows, columns] of positive ints, got {list(grid)}.")
        if len(input_shape) != 4 or min(int(s) for s in input_shape) < 1:
            raise TilingError(f"input_shape must be [N, C, H, W], got {list(input_shape)}.")
        self.input_shape = tuple(int(s) for s in input_shape)
        self._source = (network, split_after)  # a tuple: not a submodule, its weights are not registered twice
        self._macs: int | None = None
        self.graph_module = export_graph(network, torch.zeros(self.input_shape))
        self.plan = plan_tiles(self.graph_module.graph, grid, split_after)
        prefix = set(self.plan.prefix)
        order = {n: i for i, n in enumerate(self.plan.prefix)}
        self._release_after: dict[int, list[fx.Node]] = {}
        for node in self.plan.prefix:
            readers = [order[u] for u in node.users if u in prefix]
            self._release_after.setdefault(max(readers, default=order[node]), []).append(node)
        self._suffix = [n for n in self.graph_module.graph.nodes if n not in prefix and n.op != "placeholder"]
        # Free each value after its last reader, as eager Python would, or the suffix holds every activation.
        last_reader = {arg: i for i, node in enumerate(self._suffix) for arg in node.all_input_nodes}
        self._free_after: dict[int, list[fx.Node]] = {}
        for value, i in last_reader.items():
            self._free_after.setdefault(i, []).append(value)
        # Plain ints and dtypes: forward must not touch the fake tensors in node.meta (a tracer would bake them in).
        self._stitched = {n: (tuple(int(d) for d in n.meta["val"].shape), n.meta["val"].dtype)
                          for n in self.plan.outputs}
        self._sizes = {n: _spatial(n) for n in self.plan.prefix}
        self._windows = {n: _window(n) for n in self.plan.prefix if n.target in WINDOWED}
        self._window_args = {n: _arguments(n) for n in self._windows}

    def __deepcopy__(self, memo) -> TiledInference:
        # The plan refers to this graph's nodes; a copy re-traces a copy of the network instead.
        network, split_after = self._source
        return TiledInference(copy.deepcopy(network, memo), self.input_shape, self.plan.grid, split_after)

    def own_macs(self) -> int:
        """MACs of one call: the network's, plus the prefix convolutions recomputed in the halos. (Its ops are
        not modules, so hook-based counters see none of them.)"""
        if self._macs is None:
            from lightning_segcompress.utils.inspection import count_macs

            network = self._source[0]
            self._macs = count_macs(network, torch.zeros(self.input_shape)) + self.plan.tiled_prefix_macs - \
                self.plan.prefix_macs
        return self._macs

    def train(self, mode: bool = True) -> TiledInference:
        # The traced graph is eval-only (batch norm with running statistics); an exported module refuses train().
        self.training = mode
        return self

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_tracing() and tuple(x.shape) != self.input_shape:
            raise TilingError(f"This TiledInference was built for inputs {list(self.input_shape)}, got "
                              f"{list(x.shape)}; build one per input shape.")
        placeholder = next(n for n in self.graph_module.graph.nodes if n.op == "placeholder")
        env: dict[fx.Node, object] = {placeholder: x}
        for node, (shape, dtype) in self._stitched.items():
            env[node] = x.new_zeros(shape, dtype=dtype)
        full = (0, *self.input_shape[2:3], 0, self.input_shape[3])
        for regions, wanted in zip(self.plan.tiles, self.plan.output_tiles):
            self._run_tile(x, placeholder, full, regions, wanted, env)
        for step, node in enumerate(self._suffix):
            if node.op == "output":
                flat = fx.node.map_arg(node.args[0], lambda n: env[n])
                return tree_unflatten(list(flat), self.graph_module._out_spec)
            env[node] = self._run(node, env)
            for value in self._free_after.get(step, ()):
                env.pop(value, None)
        raise RuntimeError("graph has no output node")

    def _run_tile(self, x, placeholder, full, regions, wanted, env) -> None:
        tile: dict[fx.Node, tuple[torch.Tensor, Region]] = {placeholder: (x, full)}
        for step, node in enumerate(self.plan.prefix):
            region = regions.get(node)
            if node.op != "placeholder" and region is not None:
                tile[node] = (self._run_region(node, region, tile, env), region)
            for done in self._release_after.get(step, ()):
                if done in wanted and done in tile:
                    value, have = tile[done]
                    y0, y1, x0, x1 = wanted[done]
                    env[done][:, :, y0:y1, x0:x1] = _crop(value, have, wanted[done])
                tile.pop(done, None)

    def _run_region(self, node: fx.Node, region: Region, tile, env) -> torch.Tensor:
        if node in self._windows:
            window, kw = self._windows[node], dict(self._window_args[node])
            key = next(iter(kw))  # the map the window slides over is the first argument of every windowed op
            source = kw[key]
            value, have = tile[source]
            need = window.needed(region)
            clipped = _clip(need, self._sizes[source])
            crop = _crop(value, have, clipped)
            pads = (clipped[2] - need[2], need[3] - clipped[3], clipped[0] - need[0], need[1] - clipped[1])
            if any(pads):
                crop = F.pad(crop, pads, value=window.pad_value)
            kw = {k: self._value(v, env) for k, v in kw.items() if k != key}
            kw["padding"] = [0, 0]
            return node.target(crop, **kw)

        def load(arg: fx.Node):
            if arg in tile:
                value, have = tile[arg]
                return _crop(value, have, region)
            return env[arg] if arg in env else self._constant(arg, env)

        return node.target(*fx.node.map_arg(node.args, load), **fx.node.map_arg(node.kwargs, load))

    def _value(self, value, env):
        return fx.node.map_arg(value, lambda n: env[n] if n in env else self._constant(n, env))

    def _constant(self, node: fx.Node, env) -> object:
        env[node] = self._run(node, env)
        return env[node]

    def _run(self, node: fx.Node, env) -> object:
        if node.op == "get_attr":
            value = self.graph_module
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        args = self._value(node.args, env)
        kwargs = self._value(node.kwargs, env)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.graph_module.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise TilingError(f"unsupported graph node {node.op} {node.target}")
