"""Does structured pruning buy latency? Masks vs. real channel removal at 50% of the MACs, on-device runtimes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pruning_speedup.py --size 512 --threads 2 --runs 3 --rounds 5

For smp Unet(resnet18) and DeepLabV3+(tu-mobilenetv3_large_100) (random init, 19 classes) this measures, with
the DeviceBenchmark path (TorchScript lite interpreter and ExecuTorch/XNNPACK, each timed in a fresh process):

* ``baseline``;
* ``masks``: what Lightning's ``ModelPruning(pruning_fn="ln_structured", amount=0.5)`` leaves after
  ``make_pruning_permanent``: L2-structured zero masks on every conv but the classifier, same shapes;
* ``pruned (l2)``: channels really removed until 50% of the MACs are gone (``plan_step``, repo defaults,
  ``round_to=8``);
* ``pruned (l2, round_to=16)``: the same with channel counts in multiples of 16, the fp32 tile width of
  XNNPACK's and oneDNN's AVX-512 kernels (odd widths are padded up and run slower than the next multiple);
* ``pruned (latency-aware)``: ``round_to=16`` plus latency group weights (``benchmarks/_eager_group_costs.py``): groups
  whose channels buy more measured eager time per MAC than average become cheaper to remove, every group
  keeping at least a quarter of its channels (``KeepBest``).

Speedup = baseline median / stage median, MACs ratio = baseline MACs / stage MACs, efficiency = speedup /
MACs ratio (1.0: latency falls exactly like MACs). The machine may be shared (another process on one of the
cores slows 2-thread runs by 2x to 20x), so every artifact is timed in ``--rounds`` rounds of ``--runs`` runs,
interleaved across the stages of a model, and the *best* round's median is reported (all rounds are in the
JSON). Prints a Markdown table and writes benchmarks/results/pruning_speedup.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _eager_group_costs import group_costs  # benchmarks/ is on sys.path when run as a script
from torch import nn
from torch.nn.utils import prune

from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network, markdown_table
from lightning_segcompress.benchmark.report import add_stage
from lightning_segcompress.models import build_network
from lightning_segcompress.pruning import PruningConfig, build_importance, layer_widths, measure, plan_step
from lightning_segcompress.pruning.latency import KeepBest, weights_from_costs
from lightning_segcompress.pruning.state import prune_with_history
from lightning_segcompress.utils.inspection import example_input, find_classifier_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "deeplabv3plus": (
        "DeepLabV3+(mnv3-L)",
        {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
         "init_args": {"encoder_name": "tu-mobilenetv3_large_100", "encoder_weights": None}},
    ),
    "unet": (
        "Unet(R18)",
        {"class_path": "segmentation_models_pytorch.Unet",
         "init_args": {"encoder_name": "resnet18", "encoder_weights": None}},
    ),
}
HARDWARE_ROUND_TO = 16  # fp32 lanes of an AVX-512 register: XNNPACK's and oneDNN's channel tile on this CPU


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of MACs to remove (and mask amount)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per artifact")
    parser.add_argument("--runtimes", nargs="+", default=["torchscript_lite", "executorch"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pruning_speedup"))
    return parser.parse_args()


def masked(network: nn.Module, classifier: list[str], amount: float) -> nn.Module:
    """ModelPruning(pruning_fn="ln_structured", amount=...) made permanent: zeroed channels, same shapes."""
    network = copy.deepcopy(network)
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d) and name not in classifier:
            prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)
            prune.remove(module, "weight")
    return network


def pruned(network: nn.Module, example: torch.Tensor, classifier: list[str], amount: float, round_to: int,
           weights: dict[str, float] | None = None) -> tuple[nn.Module, dict]:
    reference = measure(network, example, ["macs"])["macs"]
    config = PruningConfig(ignored_layers=classifier, round_to=round_to)
    importance = build_importance("l2") if weights is None else KeepBest(build_importance("l2"), min_channels=round_to)
    start = time.perf_counter()
    plan = plan_step(network, example, importance, "macs", amount, reference, config, group_weights=weights)
    network = copy.deepcopy(network)
    prune_with_history(network, plan.history, example)
    info = {**plan.as_dict(), "round_to": round_to, "within_tolerance": plan.within_tolerance,
            "plan_s": round(time.perf_counter() - start, 1), "widths": layer_widths(network)}
    return network, info


def build_stages(network: nn.Module, example: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict]:
    """``{stage name: network}`` and what was decided for each (plans, latency weights)."""
    classifier = find_classifier_layers(network, example)
    stages = {"baseline": network, "masks (ln_structured)": masked(network, classifier, args.amount)}
    notes: dict = {"classifier": classifier}
    stages["pruned (l2)"], notes["pruned (l2)"] = pruned(network, example, classifier, args.amount, 8)
    stages["pruned (l2, round_to=16)"], notes["pruned (l2, round_to=16)"] = pruned(
        network, example, classifier, args.amount, HARDWARE_ROUND_TO)
    start = time.perf_counter()
    # One thread: per-layer timings on 2 threads are distorted many-fold whenever another process holds a core.
    costs = group_costs(network, example, classifier, threads=1, round_to=HARDWARE_ROUND_TO)
    weights = weights_from_costs(costs)
    seconds = round(time.perf_counter() - start, 1)
    stages["pruned (latency-aware)"], info = pruned(network, example, classifier, args.amount, HARDWARE_ROUND_TO,
                                                    weights)
    info["latency_weights_s"] = seconds
    info["group_costs"] = {key: {"channels": c.channels, "removed": c.removed, "saved_ms": round(c.saved_ms, 3),
                                 "saved_gmacs": round(c.saved_macs / 1e9, 4), "weight": round(weights[key], 3)}
                           for key, c in sorted(costs.items(), key=lambda kv: kv[1].ms_per_gmac)}
    notes["pruned (latency-aware)"] = info
    return stages, notes


def time_artifact(runtime: str, path: str, settings: BenchmarkSettings) -> dict:
    """One more timing of an exported artifact, by the same worker process the DeviceBenchmark uses."""
    command = [sys.executable, "-m", "lightning_segcompress.benchmark.worker", runtime, path,
               "--shape", ",".join(str(s) for s in settings.input_shape), "--threads", str(settings.threads or 0),
               "--warmup", str(settings.warmup), "--runs", str(settings.runs)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=settings.worker_timeout_s, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def retime(results: dict[str, dict], settings: BenchmarkSettings, rounds: int) -> None:
    """Time every artifact ``rounds - 1`` more times, round-robin over the stages, so that load from other
    processes hits all stages alike; report the best round (the least disturbed)."""
    entries = [entry for report in results.values() for entry in report["runtimes"].values()
               if entry.get("status") == "ok" and entry.get("path")]
    for entry in entries:
        entry["round_medians_ms"] = [entry["median_ms"]]
        entry["round_p90s_ms"] = [entry["p90_ms"]]
    for _ in range(rounds - 1):
        for entry in entries:
            runtime = "executorch" if entry["path"].endswith(".pte") else "torchscript_lite"
            timing = time_artifact(runtime, entry["path"], settings)
            entry["round_medians_ms"].append(timing["median_ms"])
            entry["round_p90s_ms"].append(timing["p90_ms"])
    for entry in entries:
        best = min(range(len(entry["round_medians_ms"])), key=entry["round_medians_ms"].__getitem__)
        entry["median_ms"] = entry["round_medians_ms"][best]
        entry["p90_ms"] = entry["round_p90s_ms"][best]


def run_model(key: str, args: argparse.Namespace, settings: BenchmarkSettings) -> tuple[dict, dict]:
    torch.manual_seed(0)
    _, spec = MODELS[key]
    network = build_network(spec, num_classes=args.classes).eval()
    example = example_input(network, size=args.size)
    networks, notes = build_stages(network, example, args)
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for i, (stage, net) in enumerate(networks.items()):
            reports[stage] = benchmark_network(net, settings, Path(workdir) / str(i))
            print(f"  exported and timed: {stage}", flush=True)
        retime(reports, settings, args.rounds)
    stages: dict[str, dict] = {}
    for stage, report in reports.items():  # after retiming, so that the ratios use the final medians
        add_stage(stages, stage, report)
    return stages, notes


def main() -> None:
    args = parse_args()
    settings = BenchmarkSettings(input_shape=(1, 3, args.size, args.size), runtimes=tuple(args.runtimes),
                                 threads=args.threads, warmup=args.warmup, runs=args.runs)
    load_before = os.getloadavg()
    results, table_stages = {}, {}
    for key in args.models:
        print(f"{MODELS[key][0]}:", flush=True)
        stages, notes = run_model(key, args, settings)
        results[key] = {"name": MODELS[key][0], "stages": stages, "notes": notes}
        table_stages.update({f"{MODELS[key][0]} {stage}": content for stage, content in stages.items()})
    load_after = os.getloadavg()

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads"
    header = (
        f"Input 1x3x{args.size}x{args.size}, {args.classes} classes, random init; {args.amount:.0%} of the MACs "
        f"removed (masks: ln_structured amount {args.amount}). {args.warmup} warm-up + {args.runs} timed runs, "
        f"{args.rounds} interleaved rounds, best round's median; machine: {machine}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.\n"
        "Ratios are baseline / stage (> 1 = faster, fewer MACs); efficiency = speedup / MACs ratio.\n\n"
    )
    table = markdown_table(table_stages, label="model / stage")
    print("\n" + header + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + table + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "load_average": {"before": load_before, "after": load_after}, "settings": vars(args),
         "models": results}, indent=2))


if __name__ == "__main__":
    main()
