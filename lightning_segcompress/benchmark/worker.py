"""Time an exported artifact in a fresh process, so runtimes don't pollute each other's memory.

``python -m lightning_segcompress.benchmark.worker RUNTIME PATH --shape 1,3,512,512 --threads 2 ...``
prints one JSON line: latency, the process's resident memory before loading the artifact and its peak
while loading and running it (on Linux the peak mark is reset after imports).
"""

from __future__ import annotations

import argparse
import json

import torch

from lightning_segcompress.benchmark.timing import (
    current_rss_mb,
    measure_latency,
    num_threads,
    peak_rss_mb,
    reset_peak_rss,
)


def load_runtime(runtime: str, path: str, threads: int | None = None):
    if runtime == "torchscript_lite":
        from lightning_segcompress.benchmark.torchscript_lite import load_lite

        return load_lite(path)
    if runtime == "executorch":
        from lightning_segcompress.benchmark.executorch_runtime import ExecuTorchProgram

        return ExecuTorchProgram(path, num_threads=threads)  # its thread pool ignores torch's setting
    raise ValueError(f"unknown runtime {runtime!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime")
    parser.add_argument("path")
    parser.add_argument("--shape", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    shape = [int(s) for s in args.shape.split(",")]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    reset_peak_rss()  # the peak then covers loading and running the model, not importing torch
    before_load = current_rss_mb() or peak_rss_mb()
    with num_threads(args.threads or None):
        program = load_runtime(args.runtime, args.path, args.threads or None)
        result = measure_latency(program, x, args.warmup, args.runs)
    peak = peak_rss_mb()
    result.update(peak_rss_mb=peak, rss_before_load_mb=before_load, model_peak_mb=peak - before_load)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
