"""Knowledge quotients (how much each residual block contributes) and the choice of the range to shunt."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from lightning_segcompress.shunt.blocks import Block, ShuntError
from lightning_segcompress.shunt.surgery import ShuntPlan, _set_module, plan_shunt
from lightning_segcompress.utils.metrics import Evaluator


def knowledge_quotients(network: nn.Module, blocks: Iterable[Block], evaluate: Evaluator,
                        full_score: float | None = None) -> dict[str, float]:
    """``KQ = 1 - score_without_block / score_full`` for every residual block (Haas et al. 2021): the block is
    replaced by an identity, ``evaluate(network)`` is measured, and the block is put back. Low KQ: the block
    can go."""
    full = evaluate(network) if full_score is None else full_score
    if full <= 0:
        raise ShuntError(f"the network scores {full} on the evaluation batches, so knowledge quotients are undefined; "
                         "train it first (or load trained weights), or give the block range explicitly.")
    quotients = {}
    for block in blocks:
        if not block.residual:
            continue
        original = network.get_submodule(block.name)
        _set_module(network, block.name, nn.Identity())
        try:
            quotients[block.name] = 1.0 - evaluate(network) / full
        finally:
            _set_module(network, block.name, original)
    return quotients


def candidate_plans(blocks: list[Block], variant: str = "arch1",
                    widths: list[list[int]] | None = None) -> list[ShuntPlan]:
    """Every contiguous range the shunt variant can replace (skip connections and strides respected)."""
    plans = []
    for i in range(len(blocks)):
        for j in range(i, len(blocks)):
            if any(b.feeds_decoder for b in blocks[i:j]):
                break  # every longer range starting at i removes the same tap
            try:
                plans.append(plan_shunt(blocks[i:j + 1], variant, widths))
            except ShuntError:
                continue
    return plans


def select_range(blocks: list[Block], quotients: Mapping[str, float], target: Mapping[str, float],
                 totals: Mapping[str, int], variant: str = "arch1",
                 widths: list[list[int]] | None = None) -> ShuntPlan:
    """The contiguous range with the lowest total KQ whose shunt removes at least ``target`` of the network.

    ``target`` is ``{"params": fraction}`` or ``{"macs": fraction}`` of ``totals`` (the whole network's
    params / MACs). Blocks that change shape are not residual and have no KQ; they count 0. A negative KQ
    (the score rose without the block: usually noise of the evaluation batches) counts 0 too, otherwise the
    longest range of such blocks would win and overshoot the target. Ties go to the shorter range, then to
    the saving closest to the target."""
    (resource, fraction), = target.items()
    needed = fraction * totals[resource]
    plans = [(plan.params_removed if resource == "params" else plan.macs_removed, plan)
             for plan in candidate_plans(blocks, variant, widths)]
    scored = [(sum(max(quotients.get(b.name, 0.0), 0.0) for b in plan.blocks), len(plan.blocks), removed, plan)
              for removed, plan in plans if removed >= needed]
    if not scored:
        best = max((removed for removed, _ in plans), default=0)
        raise ShuntError(f"no block range the {variant!r} shunt can replace removes {fraction:.0%} of the network's "
                         f"{resource} (the most any range removes is {best / max(totals[resource], 1):.1%}). Lower "
                         "the target or choose another variant.")
    scored.sort(key=lambda item: item[:3])
    return scored[0][3]
