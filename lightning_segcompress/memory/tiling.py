"""Exact tiled inference: run the high-resolution, local parts of a network tile by tile and stitch their
outputs, so that only one tile's activations are alive at a time.

Two segments are tiled: the prefix (from the input to just before the first op that is not local: image pooling,
an SE squeeze) and the tail (after the last such op to the output: decoder, upsampling). Everything between runs
untiled. Each tile of a segment's outputs needs a larger region of every tensor before it inside the segment:
walking back through a convolution or pooling window, ``in = [y0 * stride - pad, (y1 - 1) * stride - pad +
dilation * (k - 1) + 1)``; through an upsampling, the source rows its interpolation reads. Regions are propagated
backwards through the traced graph (the union over a tensor's readers); each op runs on its region with
``padding=0`` after padding only the part of its window outside the real map, so every tile equals the same region
of untiled inference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_unflatten

from lightning_segcompress.memory.regions import (
    CONVOLUTION,
    RESAMPLE,
    WINDOWED,
    Region,
    Resample,
    TilingError,
    Window,
    arguments,
    clip,
    conv_macs,
    crop_to,
    is_map,
    resample,
    spatial,
    union,
    why_not_tileable,
    window,
)
from lightning_segcompress.memory.trace import depends_on_input, export_graph, module_path, module_paths
from lightning_segcompress.utils.inspection import count_macs


@dataclass(frozen=True)
class Segment:
    """A run of local ops executed tile by tile: per tile, the region of each of its tensors."""

    nodes: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]  # read after the segment: stitched into full tensors
    tiles: tuple[dict[fx.Node, Region], ...]
    output_tiles: tuple[dict[fx.Node, Region], ...]
    macs: int  # convolution MACs untiled
    tiled_macs: int  # and summed over the tiles (halos are computed more than once)
    reason: str
    reach: dict[fx.Node, Window | Resample]  # how far each window / resampling op reads back

    def describe(self, name: str) -> str:
        first, last = (module_path(n) or n.name for n in (self.nodes[0], self.nodes[-1]))
        outs = ", ".join(f"{n.name} {list(n.meta['val'].shape)}" for n in self.outputs)
        return f"{name}: {len(self.nodes)} ops from `{first}` to `{last}`, {self.reason}; stitched: {outs}"


@dataclass(frozen=True)
class TilingPlan:
    segments: dict[str, Segment]  # "prefix" and/or "tail"
    grid: tuple[int, int]

    @property
    def macs_ratio(self) -> float:
        """Convolution MACs of the tiled segments, tiled / untiled (> 1: halo recomputation)."""
        macs = sum(s.macs for s in self.segments.values())
        return sum(s.tiled_macs for s in self.segments.values()) / macs if macs else 1.0

    def describe(self) -> str:
        parts = [segment.describe(name) for name, segment in self.segments.items()]
        return (f"{self.grid[0]}x{self.grid[1]} tiles; " + "; ".join(parts)
                + f"; convolution MACs in tiled segments x{self.macs_ratio:.2f}")


def find_prefix(graph: fx.Graph, split_after: str | None = None,
                max_stride: int | None = None) -> tuple[list[fx.Node], str]:
    """The tileable prefix (input-dependent nodes in execution order) and why it stops.

    Without ``split_after`` it runs up to the first op that is not local or whose output is downsampled more than
    ``max_stride`` times. With a module name (as in ``named_modules``, also when the network is wrapped), it ends
    after the last op of that module, and every op up to there must be local.
    """
    dependent = depends_on_input(graph)
    steps = [n for n in graph.nodes if n in dependent]
    if split_after is None:
        for i, node in enumerate(steps):
            reason = why_not_tileable(node, dependent) or _too_coarse(node, steps[0], max_stride)
            if reason is not None:
                return steps[:i], f"stops before {node.name} in `{module_path(node) or '<top>'}`: {reason}"
        return steps, "reaches the output"
    owned = [i for i, n in enumerate(steps)
             if any(p == split_after or p.endswith("." + split_after) for p in module_paths(n))]
    if not owned:
        names = sorted({p for n in steps for p in module_paths(n) if p})
        near = [p for p in names if split_after.split(".")[-1] in p][:8] or names[:8]
        raise TilingError(f"split_after={split_after!r} names no module the network runs; module names look "
                          f"like {near}.")
    for node in steps[: owned[-1] + 1]:
        reason = why_not_tileable(node, dependent)
        if reason is not None:
            raise TilingError(
                f"Cannot tile up to {split_after!r}: {node.name} in `{module_path(node) or '<top>'}` is not local "
                f"({reason}), so tiles would differ from untiled inference. End the tiled prefix before it "
                "(split_after=<an earlier module>) or leave split_after unset to stop there automatically."
            )
    return steps[: owned[-1] + 1], f"ends after `{split_after}` (split_after)"


def find_tail(graph: fx.Graph, taken: set[fx.Node], max_stride: int | None = None) -> tuple[list[fx.Node], str]:
    """The local ops after the last op that is not local (or downsampled more than ``max_stride`` times) and not in
    ``taken``, up to the output."""
    dependent = depends_on_input(graph)
    image = next(n for n in graph.nodes if n.op == "placeholder")
    steps = [n for n in graph.nodes if n in dependent and n not in taken]
    tail: list[fx.Node] = []
    reason = "starts after the prefix"
    for node in reversed(steps):
        why = why_not_tileable(node, dependent) or _too_coarse(node, image, max_stride)
        if why is not None:
            reason = f"starts after {node.name} in `{module_path(node) or '<top>'}`: {why}"
            break
        tail.insert(0, node)
    return tail, reason


def _too_coarse(node: fx.Node, image: fx.Node, max_stride: int | None) -> str | None:
    if max_stride is None or node.op == "placeholder":
        return None
    stride = max(i / o for i, o in zip(spatial(image), spatial(node)))
    return f"its output is {stride:g}x downsampled, more than max_stride={max_stride}" if stride > max_stride else None


def _tile_bounds(size: int, parts: int) -> list[int]:
    return [round(i * size / parts) for i in range(parts + 1)]


def _outputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """The segment's tensors read after it: they are stitched."""
    inside = set(nodes)
    return [n for n in nodes if n.op != "placeholder" and any(u not in inside for u in n.users)]


def plan_segment(nodes: list[fx.Node], grid: tuple[int, int], reason: str) -> Segment:
    """For each tile, the region of every tensor of the segment that the tile of its outputs needs."""
    inside, outputs = set(nodes), _outputs(nodes)
    for node in outputs:
        h, w = spatial(node)
        if h < grid[0] or w < grid[1]:
            raise TilingError(f"A {grid[0]}x{grid[1]} grid is finer than the tiled output {node.name} ({h}x{w}); "
                              "use a coarser grid or a shorter prefix (split_after).")
    reach: dict[fx.Node, Window | Resample] = {n: window(n) for n in nodes if n.target in WINDOWED}
    reach.update({n: resample(n) for n in nodes if n.target in RESAMPLE})
    convolutions = [n for n in nodes if n.target in CONVOLUTION]
    tiles, output_tiles, tiled_macs = [], [], 0
    for i in range(grid[0]):
        for j in range(grid[1]):
            wanted = {}
            for node in outputs:
                ys, xs = _tile_bounds(spatial(node)[0], grid[0]), _tile_bounds(spatial(node)[1], grid[1])
                wanted[node] = (ys[i], ys[i + 1], xs[j], xs[j + 1])
            regions = dict(wanted)
            for node in reversed(nodes):
                region = regions.get(node)
                if region is None or node.op == "placeholder":
                    continue
                for arg in node.all_input_nodes:
                    if arg in inside:
                        need = clip(reach[node].needed(region), spatial(arg)) if node in reach else region
                        regions[arg] = union(regions.get(arg), need)
            tiles.append(regions)
            output_tiles.append(wanted)
            tiled_macs += sum(conv_macs(n, regions[n]) for n in convolutions if n in regions)
    macs = sum(conv_macs(n, (0, spatial(n)[0], 0, spatial(n)[1])) for n in convolutions)
    return Segment(tuple(nodes), tuple(outputs), tuple(tiles), tuple(output_tiles), macs, tiled_macs, reason, reach)


def plan_tiles(graph: fx.Graph, grid: tuple[int, int], split_after: str | None = None, tail: bool = True,
               max_stride: int | None = 8) -> TilingPlan:
    """The prefix and (``tail``) tail segments with their per-tile regions; see :class:`TiledInference`."""
    if max_stride is not None and max_stride < 1:
        raise TilingError(f"max_stride must be >= 1 or None (no limit), got {max_stride}.")
    prefix, why_prefix = find_prefix(graph, split_after, max_stride)
    segments = {}
    if any(n.op == "call_function" for n in prefix):
        segments["prefix"] = plan_segment(prefix, grid, why_prefix)
    if tail:
        nodes, why_tail = find_tail(graph, set(prefix), max_stride)
        # a tail of maps smaller than the grid (a classifier on pooled features) is left untiled
        if any(n.op == "call_function" for n in nodes) and all(
                min(spatial(n)[0] - grid[0], spatial(n)[1] - grid[1]) >= 0 for n in _outputs(nodes)):
            segments["tail"] = plan_segment(nodes, grid, why_tail)
    if not segments:
        raise TilingError(f"Nothing to tile: no local ops at the start or the end of the network (prefix "
                          f"{why_prefix}).")
    return TilingPlan(segments, grid)


class TiledInference(nn.Module):
    """Run ``network`` on ``input_shape`` inputs with its prefix and tail computed tile by tile.

    The output equals ``network(x)`` (to float rounding). The wrapper holds a traced copy of the network for one
    input shape, in eval mode: build it after training. It traces and exports (TorchScript, torch.export) like any
    module.

    Args:
        network: the segmentation network (any module torch.export can trace).
        input_shape: ``[N, C, H, W]`` the tiled program is built for.
        grid: ``[rows, columns]`` of tiles.
        split_after: end the tiled prefix after this module (a name from ``named_modules``); default: just before
            the first op that is not local or downsampled more than ``max_stride``.
        tail: also tile the local ops after the last op that is not local (decoder, final upsampling).
        max_stride: tile only maps downsampled at most this many times (halos grow with the stride: the deeper a
            tiled segment reaches, the more each tile recomputes); ``None`` = no limit, e.g. a whole Unet.

    Example::

        tiled = TiledInference(model, [1, 3, 1024, 2048], grid=[4, 4])
        torch.testing.assert_close(tiled(x), model(x), atol=1e-4, rtol=0)
    """

    def __init__(self, network: nn.Module, input_shape: Sequence[int], grid: Sequence[int] = (2, 2),
                 split_after: str | None = None, tail: bool = True, max_stride: int | None = 8) -> None:
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or min(grid) < 1:
            raise TilingError(f"grid must be [rows, columns] of positive ints, got {list(grid)}.")
        if len(input_shape) != 4 or min(int(s) for s in input_shape) < 1:
            raise TilingError(f"input_shape must be [N, C, H, W], got {list(input_shape)}.")
        self.input_shape = tuple(int(s) for s in input_shape)
        # a tuple: not a submodule, so its weights are not registered twice
        self._source = (network, split_after, tail, max_stride)
        self._macs: int | None = None
        self.graph_module = export_graph(network, torch.zeros(self.input_shape))
        self.plan = plan_tiles(self.graph_module.graph, grid, split_after, tail, max_stride)
        self._schedule()

    def _schedule(self) -> None:
        """Execution order (segments as single items) and when each value can be freed; all plain Python values,
        so that forward never touches the fake tensors in node.meta (a tracer would bake them in)."""
        graph = self.graph_module.graph
        dependent = depends_on_input(graph)
        self._placeholder = next(n for n in graph.nodes if n.op == "placeholder")
        owner = {n: name for name, seg in self.plan.segments.items() for n in seg.nodes}
        self._items: list[str | fx.Node] = []
        for node in graph.nodes:
            if node in owner:
                if owner[node] not in self._items:
                    self._items.append(owner[node])
            elif (node in dependent and node.op != "placeholder") or node.op == "output":
                self._items.append(node)
        position = {item: i for i, item in enumerate(self._items)}
        last_read: dict[fx.Node, int] = {}
        for node in graph.nodes:
            item = position.get(owner.get(node, node))
            if item is None:
                continue
            for arg in node.all_input_nodes:
                if arg in dependent and owner.get(arg) != owner.get(node, node):
                    last_read[arg] = max(last_read.get(arg, -1), item)
        self._free_after: dict[int, list[fx.Node]] = {}
        for value, i in last_read.items():
            self._free_after.setdefault(i, []).append(value)
        self._sizes = {n: spatial(n) for n in dependent if n.op != "output" and is_map(n)}
        self._stitched = {n: (tuple(int(d) for d in n.meta["val"].shape), n.meta["val"].dtype)
                          for seg in self.plan.segments.values() for n in seg.outputs}
        self._reach = {n: op for seg in self.plan.segments.values() for n, op in seg.reach.items()}
        self._kwargs = {n: arguments(n) for n, op in self._reach.items() if isinstance(op, Window)}
        self._release: dict[str, dict[int, list[fx.Node]]] = {}
        for name, seg in self.plan.segments.items():
            order = {n: i for i, n in enumerate(seg.nodes)}
            release: dict[int, list[fx.Node]] = {}
            for node in seg.nodes:
                readers = [order[u] for u in node.users if u in order]
                release.setdefault(max(readers, default=order[node]), []).append(node)
            self._release[name] = release

    def __deepcopy__(self, memo) -> TiledInference:
        # The plan refers to this graph's nodes; a copy re-traces a copy of the network instead.
        network, *options = self._source
        return TiledInference(copy.deepcopy(network, memo), self.input_shape, self.plan.grid, *options)

    def own_macs(self) -> int:
        """MACs of one call: the network's, plus the convolutions recomputed in the halos. (Its ops are not
        modules, so hook-based counters see none of them.)"""
        if self._macs is None:
            extra = sum(s.tiled_macs - s.macs for s in self.plan.segments.values())
            self._macs = count_macs(self._source[0], torch.zeros(self.input_shape)) + extra
        return self._macs

    def train(self, mode: bool = True) -> TiledInference:
        # The traced graph is eval-only (batch norm with running statistics); an exported module refuses train().
        self.training = mode
        return self

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_tracing() and tuple(x.shape) != self.input_shape:
            raise TilingError(f"This TiledInference was built for inputs {list(self.input_shape)}, got "
                              f"{list(x.shape)}; build one per input shape.")
        env: dict[fx.Node, object] = {self._placeholder: x}
        for i, item in enumerate(self._items):
            if isinstance(item, str):
                self._run_segment(item, x, env)
            elif item.op == "output":
                flat = fx.node.map_arg(item.args[0], lambda n: env[n])
                return tree_unflatten(list(flat), self.graph_module._out_spec)
            else:
                env[item] = self._run(item, env)
            for value in self._free_after.get(i, ()):
                env.pop(value, None)
        raise RuntimeError("graph has no output node")

    def _run_segment(self, name: str, x: torch.Tensor, env: dict) -> None:
        segment, release = self.plan.segments[name], self._release[name]
        for node in segment.outputs:
            shape, dtype = self._stitched[node]
            env[node] = x.new_zeros(shape, dtype=dtype)
        for regions, wanted in zip(segment.tiles, segment.output_tiles):
            tile: dict[fx.Node, tuple[torch.Tensor, Region]] = {}
            for step, node in enumerate(segment.nodes):
                if node.op == "placeholder":
                    tile[node] = (x, (0, self.input_shape[2], 0, self.input_shape[3]))
                elif node in regions:
                    tile[node] = (self._run_region(node, regions[node], tile, env), regions[node])
                for done in release.get(step, ()):
                    if done in wanted and done in tile:
                        value, have = tile[done]
                        y0, y1, x0, x1 = wanted[done]
                        env[done][:, :, y0:y1, x0:x1] = crop_to(value, have, wanted[done])
                    tile.pop(done, None)

    def _region_of(self, arg: fx.Node, tile: dict, env: dict) -> tuple[torch.Tensor, Region]:
        if arg in tile:
            return tile[arg]
        height, width = self._sizes[arg]  # computed before the segment, in full
        return env[arg], (0, height, 0, width)

    def _run_region(self, node: fx.Node, region: Region, tile: dict, env: dict) -> torch.Tensor:
        op = self._reach.get(node)
        if isinstance(op, Window):
            kwargs = dict(self._kwargs[node])
            source = kwargs.pop(next(iter(kwargs)))  # the map a window slides over is every such op's first argument
            value, have = self._region_of(source, tile, env)
            kwargs = {k: self._value(v, env) for k, v in kwargs.items()}
            return op.run(node, kwargs, value, have, self._sizes[source], region)
        if isinstance(op, Resample):
            source = node.all_input_nodes[0]
            value, have = self._region_of(source, tile, env)
            if have == (0, *self._sizes[source][:1], 0, self._sizes[source][1]) and \
                    region == (0, *self._sizes[node][:1], 0, self._sizes[node][1]):
                return node.target(*fx.node.map_arg(node.args, lambda _: value))  # whole map: ATen's kernel
            return op.run(value, have, region)

        def load(arg: fx.Node):
            if arg in tile or arg in self._sizes and arg in env:
                value, have = self._region_of(arg, tile, env)
                return crop_to(value, have, region)
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
