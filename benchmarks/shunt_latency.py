"""Is a shunted network faster on device runtimes? Original vs shunted latency, interleaved rounds (issue 7).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/shunt_latency.py --rounds 5

Single latency measurements on this shared machine moved by up to 1.7x between two runs of the same model, so
this script alternates original and shunted networks for --rounds rounds (each round: export, reload, check
outputs, time --runs calls in a fresh process, for TorchScript lite and ExecuTorch) and reports the median
of the per-round ratios with their spread. The replaced ranges default to the ones benchmarks/shunt_replacement.py
chose automatically (random weights: latency does not depend on them). Prints a Markdown table and writes
benchmarks/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _results import write_results  # noqa: E402

from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network  # noqa: E402
from lightning_segcompress.models import build_network  # noqa: E402
from lightning_segcompress.shunt import Shunt, block_map, plan_shunt, resolve_range, splice  # noqa: E402

MODELS = {
    "DeepLabV3+ (mnv3-large)": ({"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                 "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}}, [13, 14]),
    "LR-ASPP (torchvision mnv3-large)": ({"class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"},
                                         [12, 13]),
}
RUNTIMES = ("torchscript_lite", "executorch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="shunt_latency", help="result file name in benchmarks/results")
    return parser.parse_args()


def shunted(spec: dict, blocks: list[int], classes: int) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    network = build_network(spec, num_classes=classes).eval()
    plan = plan_shunt(resolve_range(block_map(network, torch.zeros(1, 3, 96, 96)), *blocks))
    splice(network, plan.names, Shunt(plan.config))
    return network.eval(), plan.describe()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    settings = BenchmarkSettings(input_shape=(1, 3, args.size, args.size), runtimes=RUNTIMES, threads=args.threads,
                                 warmup=3, runs=args.runs)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            spec, blocks = MODELS[label]
            torch.manual_seed(0)
            networks = {"original": build_network(spec, num_classes=args.classes).eval()}
            networks["shunted"], described = shunted(spec, blocks, args.classes)
            times = {(kind, rt): [] for kind in networks for rt in RUNTIMES}
            for round_index in range(args.rounds):
                for kind, network in networks.items():
                    report = benchmark_network(network, settings, Path(tmp) / f"{label}-{kind}-{round_index}")
                    for rt in RUNTIMES:
                        times[(kind, rt)].append(report["runtimes"][rt].get("median_ms"))
                print(f"{label} round {round_index}: " + ", ".join(
                    f"{kind} {rt} {times[(kind, rt)][-1]:.1f} ms" for kind in networks for rt in RUNTIMES), flush=True)
            results[label] = {"range": described, "runtimes": {}}
            for rt in RUNTIMES:
                ratios = [o / s for o, s in zip(times[("original", rt)], times[("shunted", rt)])]
                results[label]["runtimes"][rt] = {
                    "original_ms": statistics.median(times[("original", rt)]),
                    "shunted_ms": statistics.median(times[("shunted", rt)]),
                    "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                    "speedup_max": max(ratios), "rounds": ratios}
    header = (f"Latency at 1x3x{args.size}x{args.size}, {args.rounds} interleaved rounds, median of {args.runs} calls "
              f"per round in a fresh process, {args.threads} threads; machine: {platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}; {time.time() - started:.0f} s.")
    lines = [header, "", "| model | replaced | runtime | original ms | shunted ms | speedup (median of rounds) | "
             "min .. max |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        for rt, v in r["runtimes"].items():
            lines.append(f"| {label} | {r['range']} | {rt} | {v['original_ms']:.1f} | {v['shunted_ms']:.1f} | "
                         f"{v['speedup_median']:.2f}x | {v['speedup_min']:.2f} .. {v['speedup_max']:.2f} |")
    write_results(args.name, "\n".join(lines), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
