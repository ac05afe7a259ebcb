"""An accuracy budget for a pruning schedule: after each step has been fine-tuned, compare the network's mIoU with
the unpruned one's; a step that costs more than the budget is undone. With ``backoff`` (the default) the schedule's
remaining steps then bisect between the reduction kept and the one that failed, so the fit ends with the largest
share that was measured within the budget instead of none; without it the schedule stops at the first undone step.
Pure torch: the caller scores the network and decides when."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from lightning_segcompress.utils.rollback import restore, snapshot

__all__ = ["MiouBudget", "RestorePoint", "restore", "restore_point"]

RestorePoint = dict[str, dict]


def restore_point(network: nn.Module) -> RestorePoint:
    """Everything needed to put ``network`` back exactly as it is now, even after it was pruned *and trained*
    (architecture, weights, buffers and compression state); costs one copy of the network's weights."""
    return snapshot(network, copy_weights=True)


@dataclass
class MiouBudget:
    """The budget's bookkeeping, plain data (it goes into checkpoints).

    ``max_miou_drop`` is in mIoU points (0-100) below ``reference_miou``, the network's mIoU right before the first
    step; mIoU values are fractions (0-1) as measured.
    """

    max_miou_drop: float
    reference_miou: float | None = None
    checks: list[dict] = field(default_factory=list)
    stopped_at_step: int | None = None  # without backoff: the step that was undone; None while the budget holds
    backoff: bool = True
    ceiling: float | None = None  # the smallest achieved fraction measured over the budget

    def drop_points(self, miou: float) -> float:
        if self.reference_miou is None:
            raise ValueError("the budget has no reference mIoU yet: measure the network before the first step.")
        return 100.0 * (self.reference_miou - miou)

    def judge(self, step: int, miou: float, epoch: int, fraction: float) -> bool:
        """Record the check of ``step`` (already fine-tuned, the network removes ``fraction`` of the target);
        True when it stays within the budget."""
        drop = self.drop_points(miou)
        within = drop <= self.max_miou_drop
        self.checks.append({"step": step, "epoch": epoch, "miou": miou, "drop_points": drop,
                            "achieved_fraction": fraction, "within_budget": within})
        if not within:
            self.ceiling = fraction if self.ceiling is None else min(self.ceiling, fraction)
            if not self.backoff:
                self.stopped_at_step = step
        return within

    def _last_kept(self) -> dict | None:
        kept = [c for c in self.checks if c["within_budget"]]
        return kept[-1] if kept else None

    def kept_fraction(self) -> float:
        """The achieved fraction of the last step that stayed within the budget (0 without one)."""
        last = self._last_kept()
        return last["achieved_fraction"] if last else 0.0

    def target_fraction(self, scheduled: float) -> float:
        """The fraction the next step aims at: the schedule's until a step failed, then halfway between what is kept
        and the smallest failure (never beyond the schedule)."""
        if self.ceiling is None:
            return scheduled
        return min(scheduled, 0.5 * (self.kept_fraction() + self.ceiling))

    @property
    def stopped(self) -> bool:
        return self.stopped_at_step is not None

    def summary(self) -> dict:
        last = self._last_kept()
        return {**asdict(self), "achieved_fraction": self.kept_fraction(),
                "final_drop_points": last["drop_points"] if last else 0.0,
                "undone_steps": [c["step"] for c in self.checks if not c["within_budget"]]}

    @classmethod
    def from_dict(cls, state: dict | None, max_miou_drop: float, backoff: bool = True) -> MiouBudget:
        if not state:
            return cls(max_miou_drop, backoff=backoff)
        return cls(max_miou_drop, state.get("reference_miou"), list(state.get("checks", [])),
                   state.get("stopped_at_step"), backoff, state.get("ceiling"))
