"""Latency and memory measurement shared by every runtime."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def num_threads(threads: int | None):
    """Temporarily set torch's intra-op thread count (``None`` keeps it)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(fn: Callable[[torch.Tensor], object], x: torch.Tensor, warmup: int, runs: int) -> dict:
    """Median and 90th-percentile wall time (ms) of ``fn(x)`` over ``runs`` calls after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    p90_index = min(len(times) - 1, max(0, round(0.9 * len(times) + 0.5) - 1))
    return {"median_ms": statistics.median(times), "p90_ms": times[p90_index], "runs": runs, "warmup": warmup}


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark to its current RSS (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (since the last reset, where supported), in MB."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


INT8_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_description() -> str:
    """The CPU model and the SIMD extensions that decide whether int8 kernels beat fp32 ones (e.g. ``AMD EPYC;
    avx2``): without a dot-product extension (VNNI on x86, dotprod/i8mm on ARM) XNNPACK's int8 GEMM runs at about
    the speed of its fp32 GEMM."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.lower().startswith(("model name", "hardware", "cpu model"))), "unknown CPU")
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    found = [f for f in INT8_ISA_FLAGS if f in flags]
    return f"{model}; {', '.join(found) if found else 'no avx2/vnni/dotprod'}"
