"""When to prune and how much: one-shot, linear or AGP (Zhu & Gupta 2017, cubic) schedules over epochs."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("one_shot", "linear", "agp")


@dataclass(frozen=True)
class PruningSchedule:
    """``steps`` pruning steps at epochs spread evenly from ``start_epoch`` to ``end_epoch - 1`` (``end_epoch`` is
    the first epoch without a step, as for every epoch range in this package), training in between. Step ``k``
    (1-based) brings the removed fraction to ``amount * k / steps`` (linear) or
    ``amount * (1 - (1 - k / steps) ** 3)`` (agp: big cuts early, while the network has redundancy, small ones
    late). ``one_shot`` is one step at ``start_epoch``."""

    kind: str
    amount: float
    start_epoch: int = 0
    end_epoch: int | None = None
    steps: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.kind!r}.")
        if not 0.0 < self.amount < 1.0:
            raise ValueError(f"amount must be a fraction in (0, 1), got {self.amount}: e.g. 0.5 removes half.")
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {self.start_epoch}.")
        if self.kind == "one_shot":
            if self.steps != 1 or (self.end_epoch is not None and self.end_epoch != self.start_epoch + 1):
                raise ValueError("a one_shot schedule prunes once at start_epoch: leave steps at 1 and end_epoch "
                                 "unset, or use schedule 'linear'/'agp' for several steps.")
            return
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        end = self.last_epoch
        if end < self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}, the first epoch without a step) must be > start_epoch "
                             f"({self.start_epoch}).")
        if end - self.start_epoch + 1 < self.steps:
            raise ValueError(f"{self.steps} steps need at least {self.steps} epochs, but epochs {self.start_epoch}.."
                             f"{end} (end_epoch {self.end_epoch} excluded) are only {end - self.start_epoch + 1}: "
                             "lower steps or widen the epoch range.")

    @property
    def last_epoch(self) -> int:
        """The epoch of the last step."""
        if self.kind == "one_shot" or self.end_epoch is None:
            return self.start_epoch + self.steps - 1
        return self.end_epoch - 1

    def step_epochs(self) -> list[int]:
        """The epoch of each step, in order (distinct, first = start_epoch, last = end_epoch - 1)."""
        if self.steps == 1:
            return [self.start_epoch]
        span = self.last_epoch - self.start_epoch
        return [self.start_epoch + round(k * span / (self.steps - 1)) for k in range(self.steps)]

    def fraction_after(self, step: int) -> float:
        """Cumulative fraction removed after step ``step`` (1-based)."""
        if not 1 <= step <= self.steps:
            raise ValueError(f"step must be in 1..{self.steps}, got {step}.")
        progress = step / self.steps
        if self.kind == "agp":
            return self.amount * (1.0 - (1.0 - progress) ** 3)
        return self.amount * progress
