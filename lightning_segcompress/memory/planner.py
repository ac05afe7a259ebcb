"""Arena planning: assign every activation buffer an offset in one block of memory so that buffers alive at
the same time never overlap (greedy by size with best-fit gaps: TFLite's planners, Pisarchyk & Lee 2020)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_segcompress.memory.buffers import Buffer


@dataclass(frozen=True)
class ArenaPlan:
    offsets: dict[str, int]
    arena_size: int


def plan_greedy_by_size(buffers: list[Buffer], alignment: int = 64) -> ArenaPlan:
    """Place buffers largest first; each goes into the smallest gap (between buffers already placed whose
    lifetimes overlap its own) that holds it, or after the last of them. Offsets are multiples of
    ``alignment`` bytes."""
    if alignment <= 0:
        raise ValueError(f"alignment must be a positive number of bytes, got {alignment}.")
    placed: list[tuple[int, Buffer]] = []
    offsets: dict[str, int] = {}
    for buffer in sorted(buffers, key=lambda b: (-b.size, b.first, b.name)):
        conflicts = sorted(((o, b) for o, b in placed if b.overlaps(buffer)), key=lambda item: item[0])
        best, best_gap, cursor = None, None, 0
        for offset, other in conflicts:
            gap = offset - cursor
            if gap >= buffer.size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, _align(offset + other.size, alignment))
        offset = cursor if best is None else best
        offsets[buffer.name] = offset
        placed.append((offset, buffer))
    arena = max((offset + b.size for offset, b in placed), default=0)
    return ArenaPlan(offsets=offsets, arena_size=arena)


def overlapping_pairs(buffers: list[Buffer], plan: ArenaPlan) -> list[tuple[str, str]]:
    """Pairs of buffers alive at the same time whose address ranges overlap in ``plan`` (empty = valid)."""
    bad = []
    ordered = sorted(buffers, key=lambda b: plan.offsets[b.name])
    for i, a in enumerate(ordered):
        start_a = plan.offsets[a.name]
        for b in ordered[i + 1:]:
            start_b = plan.offsets[b.name]
            if start_b >= start_a + a.size:
                break
            if a.size and b.size and a.overlaps(b):
                bad.append((a.name, b.name))
    return bad


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment
