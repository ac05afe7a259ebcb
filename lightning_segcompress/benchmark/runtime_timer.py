"""Timing a module on a registered runtime (:mod:`~lightning_segcompress.benchmark.runtimes`): exported, loaded back,
run on a number of threads. What the pruning latency model (``pruning/latency_model.py``) measures layers and
networks with."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lightning_segcompress.benchmark.runner import LogitsOnly
from lightning_segcompress.benchmark.runtimes import export_and_load, get_runtime, runtime_names
from lightning_segcompress.benchmark.timing import num_threads
from lightning_segcompress.utils.inspection import copy_without_hooks

_CACHE: dict[tuple, float] = {}  # (runtime, threads, layer spec, cin, cout, groups) -> ms


def check_runtime(runtime: str) -> str:
    """The registered name of ``runtime``; raises with the options (and the install command) when it cannot be
    timed here."""
    try:
        adapter = get_runtime(runtime)
    except ValueError:
        raise ValueError(f"runtime must be one of {list(runtime_names())}, got {runtime!r}.") from None
    available, reason = adapter.available()
    if not available:
        others = [r for r in runtime_names() if r != adapter.name]
        raise ImportError(f"runtime {adapter.name!r} cannot be timed here: {reason}. Install it with "
                          f"{adapter.install_hint}, or measure on runtime {' or '.join(repr(r) for r in others)}.")
    return adapter.name



class RuntimeTimer:
    """Exports a module to ``runtime``, loads it back and returns the minimum latency (ms) of ``runs`` runs after
    ``warmup`` runs, on ``threads`` CPU threads (``None``: torch's and ExecuTorch's defaults). Layer timings are
    cached per process; ``timed`` counts the ones this timer actually took."""

    def __init__(self, runtime: str = "executorch", threads: int | None = None, *, warmup: int = 1,
                 runs: int = 5) -> None:
        runtime = check_runtime(runtime)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for the runtime's default), got {threads}.")
        self.runtime = runtime
        self.threads = threads
        self.warmup = max(0, warmup)
        self.runs = max(1, runs)
        self.timed = 0

    def time_layer(self, spec, cin: int, cout: int, groups: int = 1) -> float:
        key = (self.runtime, self.threads, spec, int(cin), int(cout), int(groups))
        if key not in _CACHE:
            layer, x = spec.build(cin, cout, groups)
            _CACHE[key] = self.time_module(layer, x)
            self.timed += 1
        return _CACHE[key]

    def time_network(self, network: nn.Module, example: torch.Tensor) -> float:
        """The whole network (its logits), exported like the DeviceBenchmark does; ``network`` is not changed."""
        model = LogitsOnly(copy_without_hooks(network).cpu()).eval()
        return self.time_module(model, example.detach().cpu())

    def time_module(self, module: nn.Module, x: torch.Tensor) -> float:
        with tempfile.TemporaryDirectory(prefix="segcompress-latency-") as tmp, num_threads(self.threads):
            run = self._load(module.eval(), x.contiguous(), Path(tmp))
            with torch.no_grad():
                for _ in range(self.warmup):
                    run(x)
                best = math.inf
                for _ in range(self.runs):
                    start = time.perf_counter()
                    run(x)
                    best = min(best, (time.perf_counter() - start) * 1000.0)
        return best

    def _load(self, module: nn.Module, x: torch.Tensor, folder: Path) -> Callable:
        return export_and_load(get_runtime(self.runtime), module, x, folder, self.threads)


def clear_cache() -> None:
    """Forget every cached layer timing (e.g. after the machine's load changed)."""
    _CACHE.clear()
