"""The shunt: a small stack of inverted-bottleneck units that maps a block range's input to its output
(after Haas et al. 2021, "arch 1"; REFERENCE.md §1). Bias-free convolutions with BN; no residual, no SE."""

from __future__ import annotations

import math

from torch import nn

from lightning_segcompress.shunt.blocks import ShuntError

# variant -> [(expanded channels, output channels)] per unit; None = the range's output channels
VARIANTS: dict[str, list[tuple[int, int | None]]] = {
    "arch1": [(192, 64), (192, None)],
    "one_block": [(128, None)],
    "three_blocks": [(192, 64), (192, 64), (192, None)],
}


class Shunt(nn.Sequential):
    """Units of ``1x1 conv -> BN -> ReLU6 | 3x3 depthwise (stride or dilation) -> BN -> ReLU6 | 1x1 conv -> BN``.

    Built from a plain-data ``config`` (``{"in_channels": C, "units": [{"expand", "out", "stride", "dilation"}]}``),
    which is what checkpoints store.
    """

    def __init__(self, config: dict) -> None:
        layers = []
        channels = int(config["in_channels"])
        for unit in config["units"]:
            expand, out, stride, dilation = (int(unit[k]) for k in ("expand", "out", "stride", "dilation"))
            padding = dilation if stride == 1 else 1
            layers.append(nn.Sequential(
                nn.Conv2d(channels, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU6(inplace=True),
                nn.Conv2d(expand, expand, 3, stride=stride, padding=padding, dilation=dilation if stride == 1 else 1,
                          groups=expand, bias=False), nn.BatchNorm2d(expand), nn.ReLU6(inplace=True),
                nn.Conv2d(expand, out, 1, bias=False), nn.BatchNorm2d(out)))
            channels = out
        super().__init__(*layers)
        self.config = {"in_channels": int(config["in_channels"]),
                       "units": [{k: int(u[k]) for k in ("expand", "out", "stride", "dilation")}
                                 for u in config["units"]]}


def downsamples_between(in_size: int, out_size: int) -> int:
    """How many stride-2 steps lie between two spatial sizes (``round(log2(in / out))``)."""
    return round(math.log2(in_size / out_size))


def shunt_config(in_channels: int, out_channels: int, downsamples: int, dilation_in: int = 1,
                 dilation_out: int = 1, variant: str = "arch1", widths: list[list[int]] | None = None) -> dict:
    """The configuration of a shunt for a range with the given channels, number of 2x downsamples and
    dilations of its first and last depthwise convolutions.

    The first ``downsamples`` depthwise convolutions get stride 2; the others keep the range's dilation (the
    first unit ``dilation_in``, the later ones ``dilation_out``). ``widths`` overrides the variant's
    ``[[expand, out], ...]`` (the last unit's out is always ``out_channels``).
    """
    if variant not in VARIANTS:
        raise ShuntError(f"unknown shunt variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    units = [list(u) for u in (widths or VARIANTS[variant])]
    if not units or any(len(u) != 2 for u in units):
        raise ShuntError(f"widths must be a list of [expand, out] pairs, got {widths!r}.")
    if downsamples < 0:
        raise ShuntError(f"the range upsamples its input (downsamples={downsamples}); a shunt cannot do that.")
    if downsamples > len(units):
        raise ShuntError(
            f"the range downsamples {downsamples} times but the shunt variant {variant!r} has {len(units)} depthwise "
            f"convolution(s), so it can downsample at most {len(units)} times. Choose a shorter range or the variant "
            f"{_variant_for(downsamples)!r}.")
    config_units = []
    for k, (expand, out) in enumerate(units):
        last = k == len(units) - 1
        config_units.append({
            "expand": int(expand), "out": int(out_channels if last or out is None else out),
            "stride": 2 if k < downsamples else 1,
            "dilation": 1 if k < downsamples else (dilation_in if k == 0 else dilation_out)})
    return {"in_channels": int(in_channels), "units": config_units}


def _variant_for(downsamples: int) -> str:
    return next((name for name, units in VARIANTS.items() if len(units) >= downsamples), "three_blocks")
