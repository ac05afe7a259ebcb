"""The block map of a MobileNetV3 backbone: its blocks in execution order, with shapes, strides, dilations,
sizes, and which block outputs the decoder reads (skip connections).

Supported backbones: timm ``MobileNetV3Features`` (smp ``tu-mobilenetv3_*`` encoders) and torchvision's
MobileNetV3 ``IntermediateLayerGetter`` (``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_segcompress.utils.inspection import (
    count_macs,
    count_params,
    evaluation_mode,
    forward_with_hooks,
    output_tensors,
)


class ShuntError(ValueError):
    """A shunt cannot be built or placed as asked; the message says why and what to change."""


@dataclass
class Block:
    index: int
    name: str  # module path inside the network
    kind: str  # class name
    residual: bool  # output = input + f(input): removable as an identity
    in_shape: tuple[int, int, int]  # C, H, W at the example input
    out_shape: tuple[int, int, int]
    stride: int
    dilation: int  # of its depthwise convolution
    params: int
    macs: int
    feeds_decoder: bool  # the decoder (or an auxiliary head) reads this block's output

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    family: str  # "timm" or "torchvision"
    path: str  # the backbone module inside the network
    blocks: list[str]  # block paths inside the network, in execution order
    taps: dict[int, str | None]  # backbone output position -> path of the block whose output it is (None: stem)


def find_backbone(network: nn.Module) -> Backbone:
    """The supported MobileNetV3 backbone inside ``network`` (the first one found)."""
    for path, module in network.named_modules():
        kind = type(module).__name__
        if kind == "MobileNetV3Features":
            return _timm_backbone(path, module)
        if kind == "IntermediateLayerGetter" and _torchvision_blocks(module):
            return _torchvision_backbone(path, module)
    raise ShuntError(
        f"{type(network).__name__} has no supported MobileNetV3 backbone. Shunts work on smp models with encoder "
        "'tu-mobilenetv3_large_100' / 'tu-mobilenetv3_small_100' (timm MobileNetV3Features) and torchvision's "
        "deeplabv3_mobilenet_v3_large / lraspp_mobilenet_v3_large.")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _timm_backbone(path: str, module: nn.Module) -> Backbone:
    if module.feature_hooks is not None:
        raise ShuntError("timm MobileNetV3Features with feature_location='expansion' is not supported (its features "
                         "are read inside blocks); use the default feature_location='bottleneck'.")
    blocks, stage_ends = [], []
    for s, stage in enumerate(module.blocks):
        for b, _ in enumerate(stage):
            blocks.append(_join(path, f"blocks.{s}.{b}"))
        stage_ends.append(blocks[-1] if len(stage) else (stage_ends[-1] if stage_ends else None))
    # timm's forward returns the stem output if 0 is an out index, then the output of stage i - 1 for index i
    taps = {}
    for i in sorted(module._stage_out_idx):
        taps[len(taps)] = None if i == 0 else stage_ends[i - 1]
    return Backbone("timm", path, blocks, taps)


def _torchvision_blocks(module: nn.Module) -> list[str]:
    from torchvision.models.mobilenetv3 import InvertedResidual
    return [name for name, child in module.named_children() if isinstance(child, InvertedResidual)]


def _torchvision_backbone(path: str, module: nn.Module) -> Backbone:
    names = [name for name, _ in module.named_children()]
    blocks = _torchvision_blocks(module)
    taps = {}
    for position, child_name in enumerate(module.return_layers):
        # a tap after a non-block layer (e.g. the final 1x1 conv) reads the last block before it
        before = [b for b in blocks if names.index(b) <= names.index(child_name)]
        taps[position] = _join(path, before[-1]) if before else None
    return Backbone("torchvision", path, [_join(path, b) for b in blocks], taps)


def block_map(network: nn.Module, example: torch.Tensor) -> list[Block]:
    """Every block of ``network``'s MobileNetV3 backbone, measured on ``example`` (eval mode, no gradients)."""
    backbone = find_backbone(network)
    modules = dict(network.named_modules())
    shapes: dict[str, tuple] = {}
    handles = [modules[name].register_forward_hook(_record_shapes(name, shapes)) for name in backbone.blocks]
    forward_with_hooks(network, example, handles)
    read = decoder_taps(network, backbone, example)
    blocks = []
    for index, name in enumerate(backbone.blocks):
        if name not in shapes:
            continue  # a block the forward never runs (e.g. after the last feature a model reads)
        module = modules[name]
        in_shape, out_shape, block_input = shapes[name]
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        depthwise = [c for c in convs if c.groups > 1 and c.groups == c.in_channels]
        blocks.append(Block(
            index=index, name=name, kind=type(module).__name__, residual=_is_residual(module),
            in_shape=in_shape, out_shape=out_shape,
            stride=math.prod(c.stride[0] for c in convs) if convs else 1,
            dilation=depthwise[0].dilation[0] if depthwise else 1,
            params=count_params(module), macs=count_macs(module, block_input),
            feeds_decoder=name in read))
    return blocks


def _record_shapes(name: str, shapes: dict):
    def hook(module, inputs, output):
        shapes[name] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]), inputs[0][:1].detach().clone())
    return hook


def _is_residual(module: nn.Module) -> bool:
    for attribute in ("has_skip", "use_res_connect"):  # timm blocks / torchvision InvertedResidual
        if hasattr(module, attribute):
            return bool(getattr(module, attribute))
    return False


def decoder_taps(network: nn.Module, backbone: Backbone, example: torch.Tensor) -> set[str]:
    """Blocks whose output the rest of the network reads. Each backbone output is replaced by NaNs in turn:
    the ones that reach the network's output are read (measured, so unused smp features are not counted)."""
    backbone_module = network.get_submodule(backbone.path)
    read = set()
    with evaluation_mode(network):
        for position, block in backbone.taps.items():
            if block is None:
                continue

            def poison(module, inputs, output, position=position):
                keys = list(output) if isinstance(output, Mapping) else list(range(len(output)))
                replaced = dict(output) if isinstance(output, Mapping) else list(output)
                key = keys[position]
                replaced[key] = torch.full_like(replaced[key], float("nan"))
                return type(output)(replaced) if isinstance(output, Mapping) else replaced

            handle = backbone_module.register_forward_hook(poison)
            try:
                outputs = output_tensors(network(example))
            finally:
                handle.remove()
            if any(torch.isnan(t).any() for t in outputs):
                read.add(block)
    return read


def format_block_map(blocks: list[Block], quotients: Mapping[str, float] | None = None) -> str:
    """A Markdown table of the block map (with the knowledge quotient of each residual block if given)."""
    header = ("| # | block | type | residual | in (C,H,W) | out (C,H,W) | stride | dilation | params | MACs | "
              "feeds decoder |")
    rule = "|---|---|---|---|---|---|---|---|---|---|---|"
    if quotients is not None:
        header += " KQ |"
        rule += "---|"
    lines = [header, rule]
    for b in blocks:
        row = (f"| {b.index} | {b.name} | {b.kind} | {'yes' if b.residual else ''} | {b.in_shape} | {b.out_shape} | "
               f"{b.stride} | {b.dilation} | {b.params:,} | {b.macs:,} | {'yes' if b.feeds_decoder else ''} |")
        if quotients is not None:
            row += f" {quotients[b.name]:.4f} |" if b.name in quotients else " |"
        lines.append(row)
    return "\n".join(lines)
