"""Planning a shunt for a block range, splicing it into the network, and replaying that from a checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_segcompress.shunt.architecture import Shunt, downsamples_between, shunt_config
from lightning_segcompress.shunt.blocks import Block, ShuntError
from lightning_segcompress.state import get_stages, set_stage
from lightning_segcompress.utils.inspection import (
    count_macs,
    count_params,
    evaluation_mode,
    forward_with_hooks,
    has_submodule,
)
from lightning_segcompress.utils.rollback import atomic

STAGE_KIND = "shunt"


@dataclass
class ShuntPlan:
    blocks: list[Block]  # the replaced range, in order
    config: dict  # Shunt config
    params_removed: int  # params of the range minus the shunt's
    macs_removed: int

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def describe(self) -> str:
        first, last = self.blocks[0], self.blocks[-1]
        return (f"blocks {first.index}..{last.index} ({first.name} .. {last.name}), {first.in_shape} -> "
                f"{last.out_shape}")


def resolve_range(blocks: list[Block], start: int | str, end: int | str) -> list[Block]:
    """The blocks from ``start`` to ``end`` (inclusive), each given by its index in the block map or its name."""
    def find(ref: int | str) -> int:
        for position, block in enumerate(blocks):
            if ref == block.index or ref == block.name or str(ref) == str(block.index):
                return position
        raise ShuntError(f"no block {ref!r} in the backbone; blocks are {[b.index for b in blocks]} or their names "
                         f"{[b.name for b in blocks][:4]}...")
    first, last = find(start), find(end)
    if last < first:
        raise ShuntError(f"the range {start!r}..{end!r} ends before it starts.")
    return blocks[first:last + 1]


def plan_shunt(blocks: Sequence[Block], variant: str = "arch1", widths: list[list[int]] | None = None) -> ShuntPlan:
    """Check that ``blocks`` (a contiguous range) can be replaced and configure the shunt that replaces it.

    Raises :class:`ShuntError` if a block inside the range (not its last one) feeds the decoder, or the shunt
    variant cannot produce the range's downsampling."""
    blocks = list(blocks)
    if not blocks:
        raise ShuntError("the block range is empty.")
    for before, after in zip(blocks, blocks[1:]):
        if after.index != before.index + 1:
            raise ShuntError(f"blocks {before.index} and {after.index} are not consecutive.")
    inner_taps = [b for b in blocks[:-1] if b.feeds_decoder]
    if inner_taps:
        raise ShuntError(
            f"block {inner_taps[0].index} ({inner_taps[0].name}) feeds the decoder (a skip connection), so replacing "
            f"blocks {blocks[0].index}..{blocks[-1].index} would remove a tensor the decoder reads. End the range at "
            f"block {inner_taps[0].index} or start it after.")
    first, last = blocks[0], blocks[-1]
    downsamples = downsamples_between(first.in_shape[1], last.out_shape[1])
    config = shunt_config(first.in_shape[0], last.out_shape[0], downsamples, first.dilation, last.dilation,
                          variant, widths)
    shunt = Shunt(config)
    example = torch.zeros(1, *first.in_shape)
    with evaluation_mode(shunt):
        produced = tuple(shunt(example).shape[1:])
    if produced != tuple(last.out_shape):
        raise ShuntError(f"a shunt for blocks {first.index}..{last.index} produces {produced} from {first.in_shape}, "
                         f"but the range produces {last.out_shape}; the range's strides cannot be matched by stride-2 "
                         "3x3 convolutions. Choose another range.")
    return ShuntPlan(blocks, config, sum(b.params for b in blocks) - count_params(shunt),
                     sum(b.macs for b in blocks) - count_macs(shunt, example))


def restored_on_failure(network: nn.Module, names: Sequence[str]) -> contextlib.AbstractContextManager:
    """The splice of ``names`` is undone (blocks and recorded stages) if the block raises."""
    return atomic(network)


def _set_module(network: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, child, module)


def splice(network: nn.Module, names: Sequence[str], shunt: Shunt) -> list[nn.Module]:
    """Put ``shunt`` in place of the first block in ``names`` and identities in place of the rest; record the
    stage. Returns the removed blocks. On failure the network is left as it was."""
    with restored_on_failure(network, names):
        removed = [network.get_submodule(name) for name in names]
        reference = next(removed[0].parameters(), None)
        if reference is not None:
            shunt.to(device=reference.device, dtype=reference.dtype)
        shunt.train(removed[0].training)
        _set_module(network, names[0], shunt)
        for name in names[1:]:
            _set_module(network, name, nn.Identity())
        set_stage(network, {"kind": STAGE_KIND, "blocks": list(names), "shunt": shunt.config})
    return removed


def shunt_stage(network: nn.Module) -> dict | None:
    return next((s for s in get_stages(network) if s["kind"] == STAGE_KIND), None)


def apply_stage(network: nn.Module, stage: dict, applied: dict | None) -> None:
    """Checkpoint replay: splice a freshly built shunt of the stored configuration (its weights load next)."""
    if applied is not None:
        return
    missing = [name for name in stage["blocks"] if not has_submodule(network, name)]
    if missing:
        raise ShuntError(f"the checkpoint replaces blocks {missing} that {type(network).__name__} does not have: "
                         "build the network exactly as for training.")
    splice(network, stage["blocks"], Shunt(stage["shunt"]))


def modules_before(network: nn.Module, name: str, example: torch.Tensor) -> list[str]:
    """Names of the modules with parameters that run, in a forward on ``example``, before module ``name``
    starts (e.g. the stem and the blocks in front of a shunt)."""
    target = network.get_submodule(name)
    inside = {id(m) for m in target.modules()}
    order: list[str] = []
    started = []

    def pre_hook(module, inputs):
        started.append(True)

    def make_hook(module_name):
        def hook(module, inputs):
            if not started:
                order.append(module_name)
        return hook

    handles = [target.register_forward_pre_hook(pre_hook)]
    for module_name, module in network.named_modules():
        if id(module) not in inside and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(make_hook(module_name)))
    forward_with_hooks(network, example, handles)
    return order
