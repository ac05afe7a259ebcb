"""Time an exported artifact in a fresh process, so runtimes don't pollute each other's memory.

``python -m lightning_segcompress.benchmark.worker RUNTIME PATH --shape 1,3,512,512 --threads 2 ...``
prints one JSON line: latency, the process's resident memory before loading the artifact and its peak
while loading and running it (on Linux the peak mark is reset after imports).

After timing (and after the peak is read), optionally:

* ``--profile``: time per operator (:mod:`~lightning_segcompress.benchmark.profile`, separate profiled runs; with
  ``--quantized`` the float islands, with ``--delegate-dtype`` the dtype of XNNPACK ops without a type tag); the
  JSON line gains ``"profile"`` (an error is recorded there, the timing is kept).
* ``--import MODULE``: import it first (the module of a third-party runtime's adapter, which registers it).
* ``--eval EVALSET.pt``: run the artifact on the saved validation images
  (:class:`~lightning_segcompress.benchmark.accuracy.EvalSet`, in chunks of the shape's batch size); the JSON line
  gains ``"eval": {"confusion": [N, C, C] per-image confusion matrices}`` (or ``{"error": ...}``).
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch

from lightning_segcompress.benchmark.profile import profile_runtime
from lightning_segcompress.benchmark.timing import (
    current_rss_mb,
    measure_latency,
    num_threads,
    peak_rss_mb,
    reset_peak_rss,
)


def load_runtime(runtime: str, path: str, threads: int | None = None):
    from lightning_segcompress.benchmark.runtimes import get_runtime

    return get_runtime(runtime).load(path, threads)


def evaluate_file(program, eval_path: str, batch_size: int) -> dict:
    """``{"confusion": nested list}`` of ``program`` on the saved EvalSet, or ``{"error": {...}}``."""
    from lightning_segcompress.benchmark.accuracy import EvalSet, predict_confusion

    try:
        confusion = predict_confusion(program, EvalSet.load(eval_path), batch_size)
    except Exception as err:  # noqa: BLE001
        text = str(err).strip()
        return {"error": {"type": type(err).__name__, "message": text.splitlines()[0][:500] if text else ""}}
    return {"confusion": confusion.tolist()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime")
    parser.add_argument("path")
    parser.add_argument("--shape", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quantized", action="store_true")
    parser.add_argument("--delegate-dtype", choices=("int8", "float"), default=None)
    parser.add_argument("--eval", default=None)
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        help="module that registers the runtime (a third-party adapter)")
    args = parser.parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    shape = [int(s) for s in args.shape.split(",")]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    reset_peak_rss()  # the peak then covers loading and running the model, not importing torch
    before_load = current_rss_mb() or peak_rss_mb()
    with num_threads(args.threads or None):
        program = load_runtime(args.runtime, args.path, args.threads or None)
        result = measure_latency(program, x, args.warmup, args.runs)
        peak = peak_rss_mb()  # before profiling and scoring, which are not part of running the model
        if args.profile:
            result["profile"] = profile_runtime(args.runtime, program, args.path, x, args.quantized,
                                                args.delegate_dtype, args.threads or None)
        if args.eval:
            result["eval"] = evaluate_file(program, args.eval, shape[0])
    result.update(peak_rss_mb=peak, rss_before_load_mb=before_load, model_peak_mb=peak - before_load)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
