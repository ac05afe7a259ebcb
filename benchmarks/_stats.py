"""Formatting for the benchmark scripts' tables: "mean [low, high]" cells over seeds and a "difference vs control"
row with a verdict, built on :mod:`lightning_segcompress.utils.statistics` (Student-t intervals, 95 % unless
told otherwise). Differences are ``run - control``; for a metric where lower is better (latency, size) pass
``higher_is_better=False`` so that "better" still means an improvement."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_segcompress.utils.statistics import MeanCI, mean_ci, paired_seed_difference


def format_ci(ci: MeanCI, digits: int = 2, scale: float = 1.0, signed: bool = False) -> str:
    """``"mean [low, high]"`` of ``ci`` times ``scale`` (e.g. 100 for mIoU in points); with one value
    ``"mean (n=1, no interval)"``."""
    sign = "+" if signed else ""
    mean = f"{ci.mean * scale:{sign}.{digits}f}"
    if ci.low is None:
        return f"{mean} (n=1, no interval)"
    return f"{mean} [{ci.low * scale:{sign}.{digits}f}, {ci.high * scale:{sign}.{digits}f}]"


def mean_with_ci(values: Sequence[float], digits: int = 2, scale: float = 1.0, level: float = 0.95) -> str:
    """``"mean [low, high]"`` over ``values`` (one per seed), see :func:`format_ci`."""
    return format_ci(mean_ci(values, level), digits, scale)


def difference_row(control: Sequence[float], values: Sequence[float], digits: int = 2, scale: float = 1.0,
                   level: float = 0.95, higher_is_better: bool = True) -> dict:
    """The per-seed paired difference ``values[i] - control[i]`` (same seed ``i`` on both sides): ``mean``,
    ``low``, ``high`` (scaled, None with one seed), ``n``, ``text`` ("+1.23 [+0.40, +2.06]") and ``verdict``:
    ``"better"`` / ``"worse"`` when the interval excludes 0, ``"no measurable difference"`` when it covers 0,
    ``"n=1: no interval"`` with a single seed."""
    ci = paired_seed_difference(control, values, level)
    verdict = ci.verdict
    if verdict is None:
        verdict = "n=1: no interval"
    elif not higher_is_better and verdict in ("better", "worse"):
        verdict = "worse" if verdict == "better" else "better"
    scaled = (lambda v: None if v is None else v * scale)  # noqa: E731
    return {"mean": scaled(ci.mean), "low": scaled(ci.low), "high": scaled(ci.high), "n": ci.n, "level": level,
            "text": format_ci(ci, digits, scale, signed=True), "verdict": verdict}
