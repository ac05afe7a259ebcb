"""Which ops are local (each output pixel reads a bounded neighbourhood of its inputs), which input region an
output region needs, and how to compute an op on a region so that it equals the same region of the full map."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.operator_schemas import normalize_function

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
BILINEAR = _ops("upsample_bilinear2d.vec")
NEAREST = _ops("upsample_nearest2d.vec")
RESAMPLE = BILINEAR | NEAREST


def arguments(node: fx.Node) -> dict:
    """The op's arguments by schema name (``input``/``self`` first)."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise TilingError(f"cannot read the arguments of {node.target}")
    return dict(normalized.kwargs)


def spatial(node: fx.Node) -> tuple[int, int]:
    shape = node.meta["val"].shape
    return int(shape[-2]), int(shape[-1])


def is_map(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()


def _pair(value, default: int) -> tuple[int, int]:
    if value is None or (isinstance(value, Sequence) and len(value) == 0):
        return default, default
    if isinstance(value, int):
        return value, value
    return (int(value[0]), int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Window:
    """A sliding window (convolution, pooling): ``in = [y0 * s - p, (y1 - 1) * s - p + d * (k - 1) + 1)``."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pad_value: float

    def needed(self, region: Region) -> Region:
        return (*self._axis(region[0], region[1], 0), *self._axis(region[2], region[3], 1))

    def _axis(self, start: int, stop: int, axis: int) -> tuple[int, int]:
        s, p, d, k = self.stride[axis], self.padding[axis], self.dilation[axis], self.kernel[axis]
        return start * s - p, (stop - 1) * s - p + d * (k - 1) + 1

    def run(self, node: fx.Node, kwargs: dict, source: torch.Tensor, have: Region, size: tuple[int, int],
            region: Region) -> torch.Tensor:
        """The op on ``region``: crop the window, pad what lies outside the real map, run with padding 0."""
        need = self.needed(region)
        clipped = clip(need, size)
        crop = crop_to(source, have, clipped)
        left, right, top, bottom = (clipped[2] - need[2], need[3] - clipped[3], clipped[0] - need[0],
                                    need[1] - clipped[1])
        if left == right and top == bottom:  # interior tiles (0) or a tile spanning the axis (the op's own padding)
            return node.target(crop, **{**kwargs, "padding": [top, left]})
        crop = F.pad(crop, (left, right, top, bottom), value=self.pad_value)
        return node.target(crop, **{**kwargs, "padding": [0, 0]})


def window(node: fx.Node) -> Window:
    kw = arguments(node)
    if node.target in CONVOLUTION:
        weight = kw["weight"].meta["val"]
        kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
        return Window(kernel, _pair(kw.get("stride"), 1), _pair(kw.get("padding"), 0), _pair(kw.get("dilation"), 1),
                      0.0)
    kernel = _pair(kw["kernel_size"], 1)
    stride = _pair(kw.get("stride"), 0)
    stride = kernel if stride == (0, 0) else stride
    dilation = _pair(kw.get("dilation"), 1) if node.target in MAX_POOL else (1, 1)
    return Window(kernel, stride, _pair(kw.get("padding"), 0), dilation, -math.inf if node.target in MAX_POOL else 0.0)


@dataclass(frozen=True)
class Resample:
    """Bilinear or nearest upsampling as per-row and per-column source indices and weights (absolute, computed
    as ATen does), so any output region can be computed from the input rows and columns it reads."""

    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # first source index, second, weight of the second
    cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    weighted: bool  # bilinear; nearest only gathers

    def needed(self, region: Region) -> Region:
        r0, r1, _ = (t[region[0]:region[1]] for t in self.rows)
        c0, c1, _ = (t[region[2]:region[3]] for t in self.cols)
        return int(r0.min()), int(r1.max()) + 1, int(c0.min()), int(c1.max()) + 1

    def run(self, source: torch.Tensor, have: Region, region: Region) -> torch.Tensor:
        c0, c1, cw = (t[region[2]:region[3]] for t in self.cols)
        r0, r1, rw = (t[region[0]:region[1]] for t in self.rows)
        if not self.weighted:
            return source.index_select(3, c0 - have[2]).index_select(2, r0 - have[0])
        # rows first: the input has fewer rows than the output, so the intermediate is the smaller one
        rows = torch.lerp(source.index_select(2, r0 - have[0]), source.index_select(2, r1 - have[0]), rw.view(-1, 1))
        return torch.lerp(rows.index_select(3, c0 - have[2]), rows.index_select(3, c1 - have[2]), cw)


def resample(node: fx.Node) -> Resample:
    kw = arguments(node)
    source = kw.get("input", kw.get("self"))
    size_in, size_out = spatial(source), spatial(node)
    scales = kw.get("scale_factors") or (None, None)
    bilinear = node.target in BILINEAR
    axes = [_source_indices(size_in[a], size_out[a], scales[a], bilinear, bool(kw.get("align_corners")))
            for a in (0, 1)]
    return Resample(*axes, weighted=bilinear)


def _source_indices(size_in: int, size_out: int, scale: float | None, bilinear: bool, align_corners: bool):
    """ATen's ``area_pixel_compute_source_index`` (bilinear) and ``nearest_idx``, in float32 like its kernels."""
    dst = torch.arange(size_out, dtype=torch.float32)
    if not bilinear:
        if size_out == size_in:
            index = torch.arange(size_out)
        elif size_out == 2 * size_in:
            index = torch.arange(size_out) // 2
        else:
            ratio = torch.tensor(1.0 / scale if scale else size_in / size_out, dtype=torch.float32)
            index = torch.clamp(torch.floor(dst * ratio).long(), max=size_in - 1)
        return index, index, torch.zeros(size_out)
    if align_corners:
        ratio = torch.tensor((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0, dtype=torch.float32)
        src = dst * ratio
    else:
        ratio = torch.tensor(1.0 / scale if scale and scale > 0 else size_in / size_out, dtype=torch.float32)
        src = torch.clamp(ratio * (dst + 0.5) - 0.5, min=0.0)
    first = src.long()
    second = first + (first < size_in - 1).long()
    return first, second, src - first


def why_not_tileable(node: fx.Node, dependent: set[fx.Node]) -> str | None:
    """None where ``node`` is local and runs on regions; otherwise the reason."""
    if node.op == "placeholder":
        return None if is_map(node) else f"input {_shape(node)} is not an NCHW image"
    if node.op != "call_function":
        return f"{node.op} {node.target}"
    if node.target is operator.getitem:
        return "tuple output"
    if not is_map(node):
        return f"{node.target} produces {_shape(node)}, not a feature map"
    inputs = [a for a in node.all_input_nodes if a in dependent]
    if node.target in CONCAT:
        if arguments(node).get("dim", 0) not in (1, -3):
            return "concatenation along a spatial axis"
    elif node.target in WINDOWED:
        kw = arguments(node)
        if kw.get("ceil_mode") and not _floor_size_matches(node):
            return "pooling with ceil_mode whose output is larger than the floor formula"
        if node.target in AVG_POOL and not kw.get("count_include_pad", True) and any(_pair(kw.get("padding"), 0)):
            return "average pooling that excludes padding from the count"
        if node.target in CONVOLUTION and isinstance(kw.get("padding"), str):
            return "string padding"
        if any(a is not kw.get("input", kw.get("self")) for a in inputs):
            return "weights computed from the input"
    elif node.target in RESAMPLE:
        if any(a is not arguments(node).get("input") for a in inputs):
            return "resampling with a size computed from the input"
    elif node.target in POINTWISE:
        kw = arguments(node)
        if node.target in _ops("batch_norm") and kw.get("training"):
            return "batch norm in training mode"
        if node.target in _ops("dropout") and kw.get("train"):
            return "dropout in training mode"
        out = spatial(node)
        for arg in node.all_input_nodes:
            if arg in dependent and (not is_map(arg) or spatial(arg) != out):
                return f"broadcasts {arg.name} {_shape(arg)} over the map (a global value)"
            value = arg.meta.get("val")
            if arg not in dependent and isinstance(value, torch.Tensor) and value.dim() >= 2 and \
                    any(int(s) != 1 for s in value.shape[-2:]):
                return f"reads a constant {list(value.shape)} that varies over the map"
    else:
        return f"{node.target} is not a local op (global pooling or reshaping)"
    return None


def _shape(node: fx.Node):
    value = node.meta.get("val")
    return list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _floor_size_matches(node: fx.Node) -> bool:
    w = window(node)
    size_in, size_out = spatial(arguments(node)["input"]), spatial(node)
    for axis in (0, 1):
        k, s, p, d = w.kernel[axis], w.stride[axis], w.padding[axis], w.dilation[axis]
        if (size_in[axis] + 2 * p - d * (k - 1) - 1) // s + 1 != size_out[axis]:
            return False
    return True


def clip(region: Region, size: tuple[int, int]) -> Region:
    y0, y1, x0, x1 = region
    return max(y0, 0), min(y1, size[0]), max(x0, 0), min(x1, size[1])


def union(a: Region | None, b: Region) -> Region:
    if a is None:
        return b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def crop_to(value: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    if have == want:
        return value
    return value[:, :, want[0] - have[0]: want[1] - have[0], want[2] - have[2]: want[3] - have[2]]


def conv_macs(node: fx.Node, region: Region) -> int:
    weight = arguments(node)["weight"].meta["val"]
    return (region[1] - region[0]) * (region[3] - region[2]) * weight.numel()
