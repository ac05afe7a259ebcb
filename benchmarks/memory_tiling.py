"""How much activation memory do planning and tiling save? (issue 9, the project's P5 goal)

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_tiling.py --rounds 2

For smp DeepLabV3+ (tu-mobilenetv3_large_100) and Unet (resnet18), 19 classes, at --size (default 1024x2048):
- the planner's numbers (fp32 and int8): naive sum of all activations, planned arena, lower bound, for the
  network and for TiledInference with each --grids grid (the plan of the tiled program itself; "4x4:none" =
  max_stride None, tiling as deep as the network's local ops go), and the largest difference between tiled and
  untiled outputs;
- eager inference in a fresh process per configuration, --rounds interleaved rounds: peak RSS growth during the
  timed calls (after one warm-up call, the peak mark reset) and median latency. "graph 1x1" is TiledInference
  with one tile: the same graph executor without tiling, which frees every tensor after its last reader (eager
  Python holds some longer), so tiling's own effect is the step from 1x1 to the grids.
Random weights: memory and latency do not depend on them. Prints a Markdown table and writes
benchmarks/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _results import write_results  # noqa: E402

from lightning_segcompress.benchmark import LogitsOnly  # noqa: E402
from lightning_segcompress.benchmark.report import format_value  # noqa: E402
from lightning_segcompress.benchmark.timing import current_rss_mb, measure_latency, peak_rss_mb, reset_peak_rss  # noqa: E402
from lightning_segcompress.memory import TiledInference, memory_report  # noqa: E402
from lightning_segcompress.models import build_network  # noqa: E402

MODELS = {
    "DeepLabV3+ (mnv3-large)": {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}},
    "Unet (resnet18)": {"class_path": "segmentation_models_pytorch.Unet", "init_args": {"encoder_name": "resnet18"}},
}


def build(model: str, config: list | None, shape: list[int]) -> torch.nn.Module:
    """The network, or (``config = [grid, max_stride]``) its TiledInference."""
    torch.manual_seed(0)
    net = LogitsOnly(build_network(MODELS[model], num_classes=19)).eval()
    return net if config is None else TiledInference(net, shape, config[0], max_stride=config[1])


def worker(model: str, config: list | None, shape: list[int], runs: int) -> dict:
    """One configuration in this (fresh) process: RSS growth during the timed calls and their latency."""
    net = build(model, config, shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net(x)  # warm-up: kernels' one-off allocations are not the activations
        reset_peak_rss()
        before = current_rss_mb()
        latency = measure_latency(net, x, warmup=0, runs=runs)
    return {"rss_growth_mb": peak_rss_mb() - before, "median_ms": latency["median_ms"]}


def planner_numbers(model: str, config: list | None, shape: list[int], reference) -> dict:
    net = build(model, config, shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    report = memory_report(net, x, measure=False)
    row = {"naive_mb": report.fp32.naive / 1e6, "planned_mb": report.fp32.planned / 1e6,
           "lower_bound_mb": report.fp32.lower_bound / 1e6, "int8_naive_mb": report.int8.naive / 1e6,
           "int8_planned_mb": report.int8.planned / 1e6, "peak_at": report.fp32.peak_module or report.fp32.peak_op,
           "plan_s": time.perf_counter() - started}
    with torch.no_grad():
        output = net(x)
    row["max_abs_diff"] = 0.0 if reference is None else float((output - reference).abs().max())
    if config is not None:
        row["macs_ratio"] = net.plan.macs_ratio
        row["segments"] = net.plan.describe()
    return row, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048])
    parser.add_argument("--grids", default="2x2,4x4,4x4:none")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--name", default="memory_tiling")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = [1, 3, *args.size]
    if args.worker:
        model, grid = json.loads(args.worker)
        print(json.dumps(worker(model, grid, shape, args.runs)))
        return

    tiled = [_config(text) for text in args.grids.split(",")]
    configs = [None, [[1, 1], None], *tiled]
    started = time.time()
    data: dict = {"settings": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "models": {}}
    for model in args.models:
        rows, reference = {}, None
        for config in [None, *tiled]:
            rows[_label(config)], output = planner_numbers(model, config, shape, reference)
            reference = output if config is None else reference
            print(model, _label(config), rows[_label(config)], flush=True)
        data["models"][model] = {"planner": rows, "eager": {_label(c): [] for c in configs}}
    for _ in range(args.rounds):  # interleaved, so that machine load hits every configuration alike
        for model in args.models:
            for config in configs:
                command = [sys.executable, __file__, "--worker", json.dumps([model, config]),
                           "--size", *map(str, args.size), "--runs", str(args.runs), "--threads", str(args.threads)]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                data["models"][model]["eager"][_label(config)].append(measured)
                print(model, _label(config), measured, flush=True)
    data["seconds"] = time.time() - started
    write_results(args.name, _table(data, shape), data)


def _config(text: str) -> list:
    grid, _, stride = text.partition(":")
    return [[int(v) for v in grid.split("x")], None if stride == "none" else int(stride or 8)]


def _label(config) -> str:
    if config is None:
        return "untiled"
    (rows, cols), stride = config
    if [rows, cols] == [1, 1]:
        return "graph 1x1"
    return f"tiled {rows}x{cols}" + ("" if stride == 8 else f", max_stride {stride}")


def _table(data: dict, shape: list[int]) -> str:
    s = data["settings"]
    lines = [
        f"# Activation memory: planning and tiling at {shape[2]}x{shape[3]}", "",
        f"`HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_tiling.py --rounds {s['rounds']}` on "
        f"{data['machine']}, {s['threads']} threads, {data['seconds']:.0f} s. Planner: naive = every activation "
        "in its own buffer, planned = greedy-by-size arena, lower bound = most bytes alive at once (fp32; int8 "
        "counts one byte per activation). Eager: fresh process per configuration, RSS growth over the timed calls "
        f"after a warm-up, median of {s['runs']} calls; medians over {s['rounds']} interleaved rounds. `graph 1x1` = "
        "the tiled executor with one tile (frees tensors at their last use).", "",
        "| model | program | naive MB | planned MB | lower bound MB | planned / naive (fp32) | int8 planned MB | "
        "max abs diff | tiled MACs | eager RSS growth MB | eager ms | peak at |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, result in data["models"].items():
        naive = result["planner"]["untiled"]["naive_mb"]
        for label in result["eager"]:
            plan = result["planner"].get(label)
            eager = result["eager"][label]
            rss = statistics.median(e["rss_growth_mb"] for e in eager) if eager else None
            ms = statistics.median(e["median_ms"] for e in eager) if eager else None
            if plan is None:
                cells = [model, label, "", "", "", "", "", "", "", format_value(rss, 0), format_value(ms, 0), ""]
            else:
                cells = [model, label, format_value(plan["naive_mb"], 1), format_value(plan["planned_mb"], 1),
                         format_value(plan["lower_bound_mb"], 1),
                         format_value(plan["planned_mb"] / naive, 3), format_value(plan["int8_planned_mb"], 1),
                         f"{plan['max_abs_diff']:.1e}", format_value(plan.get("macs_ratio"), 2, "x"),
                         format_value(rss, 0), format_value(ms, 0), f"`{plan['peak_at']}`"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "planned / naive is against the untiled network's naive sum; prefix MACs = convolution MACs of "
                  "the tiled segments, tiled / untiled. Segments:"]
    for model, result in data["models"].items():
        for label, plan in result["planner"].items():
            if "segments" in plan:
                lines.append(f"- {model}, {label}: {plan['segments']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
