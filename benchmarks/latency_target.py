"""Latency as a pruning target: does ``StructuredPruning(target="latency")`` remove the milliseconds it is asked to?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/latency_target.py --size 512 --threads 2

For smp DeepLabV3+(tu-mobilenetv3_large_100) and Unet(resnet18) (encoder_weights=None, --classes classes), on
each runtime (ExecuTorch/XNNPACK and the TorchScript lite interpreter):

1. a baseline is trained on SyntheticScenes at --train_size for --baseline_epochs (``--no_finetune``: random
   init, no training at all);
2. the latency model (``pruning/latency_model.py``) is built on it at --size x --size with --threads threads:
   every prunable convolution exported alone to the runtime and timed at 1, 1/2 and 1/4 of its widths, plus the
   whole network as it is and uniformly thinned (the two-point calibration); its build time and number of grid
   points are reported;
3. one-shot plans (``plan_step``, l2 importance, the callback's defaults but ``round_to`` --round_to):
   * ``latency``: remove --amount of the predicted latency (what ``StructuredPruning(target="latency")`` does);
   * ``latency, ranked``: the same, with ``latency_ranking`` (groups weighted by ms per MAC on the runtime);
   * ``macs, same speed``: a MACs target at the MACs fraction the ``latency`` plan removed, i.e. the MACs
     target that reaches the same speed. With the same l2 ranking both searches move along the same channel
     ratio, so this is normally the *same* network (then it is not timed or trained twice);
4. the baseline and every pruned network are exported and timed in a fresh process with the DeviceBenchmark's
   worker (``--rounds`` interleaved rounds of --runs runs, best round's median, as in pruning_speedup.py).
   Achieved speedup = baseline ms / pruned ms vs requested 1 / (1 - amount); the goal is within +-10 %;
5. (unless ``--no_finetune``) every pruned network is fine-tuned from the baseline's weights for
   --finetune_epochs at --train_size; val mIoU shows which variant keeps more accuracy at that speed.

Prints Markdown tables and writes benchmarks/results/latency_target.{md,json} (``--name``). A smoke run:
``--size 64 --models unet --runtimes torchscript_lite --baseline_epochs 1 --finetune_epochs 1 --num_train 8
--num_val 4 --rounds 1 --runs 2 --name latency_target_smoke``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _results import write_results  # noqa: E402
from _training import fit  # noqa: E402
from pruning_speedup import MODELS, retime  # noqa: E402

from lightning_segcompress import SegmentationModule  # noqa: E402
from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network  # noqa: E402
from lightning_segcompress.pruning import PruningConfig, build_importance, measure, plan_step  # noqa: E402
from lightning_segcompress.pruning.latency import KeepBest, model_group_costs, weights_from_costs  # noqa: E402
from lightning_segcompress.pruning.latency_model import build_latency_model  # noqa: E402
from lightning_segcompress.pruning.state import prune_with_history  # noqa: E402
from lightning_segcompress.utils.inspection import example_input, find_classifier_layers  # noqa: E402

VARIANTS = ("latency", "latency, ranked", "macs, same speed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runtimes", nargs="+", default=["executorch", "torchscript_lite"],
                        choices=["executorch", "torchscript_lite", "eager"])
    parser.add_argument("--size", type=int, default=512, help="input size latency is modelled and measured at")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of the latency to remove")
    parser.add_argument("--round_to", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer_runs", type=int, default=5, help="timed runs per layer and width (minimum kept)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per round of a whole network")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per network")
    parser.add_argument("--no_finetune", action="store_true", help="random init, no training (timing only)")
    parser.add_argument("--train_size", type=int, default=96)
    parser.add_argument("--num_train", type=int, default=96)
    parser.add_argument("--num_val", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--baseline_epochs", type=int, default=8)
    parser.add_argument("--finetune_epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--finetune_lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="latency_target", help="result file name in benchmarks/results")
    return parser.parse_args()


def training_args(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments ``_training`` reads, with the training image size."""
    return argparse.Namespace(**{**vars(args), "size": args.train_size})


def plans(network, example, classifier, model, args) -> dict[str, dict]:
    """The three one-shot plans of one runtime: ``{variant: {"history", "plan", "plan_s"}}``."""
    config = PruningConfig(ignored_layers=classifier, round_to=args.round_to)
    out = {}
    start = time.perf_counter()
    plan = plan_step(network, example, build_importance("l2"), "latency", args.amount, model.reference_ms, config,
                     latency_model=model)
    out["latency"] = {"history": plan.history, "plan": plan.as_dict(), "plan_s": time.perf_counter() - start}
    start = time.perf_counter()
    weights = weights_from_costs(model_group_costs(model, network, example, classifier, round_to=args.round_to))
    plan = plan_step(network, example, KeepBest(build_importance("l2"), min_channels=args.round_to), "latency",
                     args.amount, model.reference_ms, config, group_weights=weights, latency_model=model)
    out["latency, ranked"] = {"history": plan.history, "plan": plan.as_dict(), "plan_s": time.perf_counter() - start}
    reference_macs = measure(network, example, ["macs"])["macs"]
    pruned = copy.deepcopy(network)
    prune_with_history(pruned, out["latency"]["history"], example)
    macs_fraction = 1.0 - measure(pruned, example, ["macs"])["macs"] / reference_macs
    start = time.perf_counter()
    plan = plan_step(network, example, build_importance("l2"), "macs", macs_fraction, reference_macs, config)
    out["macs, same speed"] = {"history": plan.history, "plan": plan.as_dict(), "plan_s": time.perf_counter() - start}
    return out


def pruned_copy(network, history, example):
    pruned = copy.deepcopy(network)
    prune_with_history(pruned, history, example)
    return pruned.eval()


def run_model(key: str, args: argparse.Namespace, root: Path) -> dict:
    name, spec = MODELS[key]
    settings = BenchmarkSettings(input_shape=(1, 3, args.size, args.size), runtimes=("eager",), threads=args.threads,
                                 warmup=args.warmup, runs=args.runs, memory=False)
    if args.no_finetune:
        torch.manual_seed(args.seed)
        module, baseline_miou = SegmentationModule(spec, num_classes=args.classes), None
    else:
        baseline_miou, module = fit(training_args(args), spec, args.baseline_epochs, args.seed, args.lr,
                                    root / f"{key}-baseline")
        print(f"{name}: baseline val mIoU {baseline_miou:.4f}", flush=True)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    network = module.net.eval()
    example = example_input(network, size=args.size)
    classifier = find_classifier_layers(network, example)
    result = {"name": name, "baseline_miou": baseline_miou, "runtimes": {}}
    for runtime in args.runtimes:
        print(f"{name} / {runtime}: building the latency model...", flush=True)
        model = build_latency_model(network, example, runtime, threads=args.threads, ignored_layers=classifier,
                                    round_to=args.round_to, runs=args.layer_runs)
        print(f"  built in {model.build_s:.0f} s ({model.timings} grid points, {len(model.layers)} layers): "
              f"{model.measured_ms:.1f} ms measured = {model.scale:.3f} x modelled + {model.constant_ms:.1f} ms; "
              f"calibration {model.calibration}", flush=True)
        planned = plans(network, example, classifier, model, args)
        networks = {"baseline": network}
        for variant, entry in planned.items():
            same = next((v for v in networks if v != "baseline" and planned[v]["history"] == entry["history"]), None)
            entry["same_network_as"] = same
            if same is None:
                networks[variant] = pruned_copy(network, entry["history"], example)
        runtime_settings = BenchmarkSettings(**{**settings.as_dict(), "runtimes": (runtime,)})
        reports = {}
        with tempfile.TemporaryDirectory() as workdir:
            for i, (variant, net) in enumerate(networks.items()):
                reports[variant] = benchmark_network(net, runtime_settings, Path(workdir) / str(i))
            retime(reports, runtime_settings, args.rounds)
        base = reports["baseline"]["runtimes"][runtime]
        rows = {"baseline": {"measured_ms": base.get("median_ms"), "status": base.get("status"),
                             "predicted_ms": model.reference_ms, "macs": reports["baseline"]["macs"]}}
        for variant, entry in planned.items():
            source = entry["same_network_as"] or variant
            timing = reports[source]["runtimes"][runtime]
            net = networks[source]
            row = {"plan": entry["plan"], "plan_s": round(entry["plan_s"], 1),
                   "same_network_as": entry["same_network_as"], "predicted_ms": model.predict(net),
                   "measured_ms": timing.get("median_ms"),
                   "status": timing.get("status"), "error": timing.get("error"), "macs": reports[source]["macs"],
                   "history": entry["history"]}
            if row["measured_ms"] and rows["baseline"]["measured_ms"]:
                row["speedup"] = rows["baseline"]["measured_ms"] / row["measured_ms"]
                row["speedup_error"] = row["speedup"] * (1.0 - args.amount) - 1.0
            rows[variant] = row
            print(f"  {variant}: predicted {row['predicted_ms']:.1f} ms, measured {row['measured_ms']} ms, speedup "
                  f"{row.get('speedup', float('nan')):.2f}x (requested {1 / (1 - args.amount):.2f}x)", flush=True)
        result["runtimes"][runtime] = {"model": {k: v for k, v in model.as_dict().items() if k != "layers"},
                                       "layers": {n: t.ms for n, t in model.layers.items()}, "rows": rows}
        if not args.no_finetune:
            for variant, row in rows.items():
                if variant == "baseline":
                    continue
                if row["same_network_as"]:
                    row["miou"] = rows[row["same_network_as"]].get("miou")
                    continue
                history = row["history"]

                def prepare(fresh, history=history):
                    prune_with_history(fresh.net, history, example_input(fresh.net, size=args.size))

                pruned_weights = pruned_state(spec, args, weights, history)
                row["miou"], _ = fit(training_args(args), spec, args.finetune_epochs, args.seed, args.finetune_lr,
                                     root / f"{key}-{runtime}-{variant}", weights=pruned_weights, prepare=prepare)
                print(f"  {variant}: fine-tuned val mIoU {row['miou']:.4f}", flush=True)
    return result


def pruned_state(spec: dict, args: argparse.Namespace, weights: dict, history) -> dict:
    """The baseline's weights, pruned by ``history``."""
    module = SegmentationModule(spec, num_classes=args.classes)
    module.load_state_dict(weights)
    prune_with_history(module.net, history, example_input(module.net, size=args.size))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def report(args: argparse.Namespace, results: dict, seconds: float) -> str:
    requested = 1.0 / (1.0 - args.amount)
    training = ("random init, no fine-tuning" if args.no_finetune else
                f"baseline {args.baseline_epochs} epochs on SyntheticScenes {args.train_size}x{args.train_size} "
                f"({args.num_train} train / {args.num_val} val images, lr {args.lr}), pruned networks fine-tuned "
                f"{args.finetune_epochs} epochs (lr {args.finetune_lr}) from its weights")
    lines = [
        f"Input 1x3x{args.size}x{args.size}, {args.classes} classes; {args.amount:.0%} of the latency requested "
        f"(speedup {requested:.2f}x), one shot, l2, round_to {args.round_to}; {args.threads} threads; "
        f"{args.warmup} warm-up + {args.runs} runs, {args.rounds} interleaved rounds, best round's median, each "
        f"network in a fresh process; {training}; machine: {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}; load average {os.getloadavg()[0]:.2f} at the end; {seconds:.0f} s in all.",
        "",
        "Latency model (built once per network and runtime):",
        "",
        "| model | runtime | build s | grid points | layers modelled | measured ms | thinned (0.3) ms | scale | "
        "constant ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results.values():
        for runtime, entry in result["runtimes"].items():
            m = entry["model"]
            calibration = m.get("calibration") or {}
            thinned = _ms(calibration.get("measured_ms")) + (" (scale rejected)" if "note" in calibration else "")
            lines.append(f"| {result['name']} | {runtime} | {m['build_s']:.0f} | {m['timings']} | "
                         f"{len(entry['layers'])} | {m['measured_ms']:.1f} | {thinned} | {m['scale']:.3f} | "
                         f"{m['constant_ms']:.1f} |")
    lines += ["", "| model | runtime | variant | planned (predicted removed) | predicted ms | measured ms | speedup "
              f"(requested {requested:.2f}x) | error | MACs removed | val mIoU |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results.values():
        for runtime, entry in result["runtimes"].items():
            rows = entry["rows"]
            base = rows["baseline"]
            miou = result["baseline_miou"]
            lines.append(f"| {result['name']} | {runtime} | baseline | | {base['predicted_ms']:.1f} | "
                         f"{_ms(base['measured_ms'])} | | | | {'' if miou is None else f'{miou:.4f}'} |")
            for variant in VARIANTS:
                row = rows[variant]
                same = f" (= {row['same_network_as']})" if row["same_network_as"] else ""
                speed = f"{row['speedup']:.2f}x" if "speedup" in row else row.get("status", "")
                error = f"{row['speedup_error']:+.1%}" if "speedup_error" in row else ""
                macs = 1.0 - row["macs"] / base["macs"] if row.get("macs") and base.get("macs") else None
                removed = 1.0 - row["predicted_ms"] / base["predicted_ms"]
                lines.append(f"| {result['name']} | {runtime} | {variant}{same} | {removed:.1%} | "
                             f"{row['predicted_ms']:.1f} | "
                             f"{_ms(row['measured_ms'])} | {speed} | {error} | "
                             f"{'' if macs is None else f'{macs:.1%}'} | "
                             f"{'' if row.get('miou') is None else format(row['miou'], '.4f')} |")
    lines += ["", "Error = achieved speedup / requested - 1 (goal: within +-10 %). Planned: the fraction of the "
              "predicted latency the plan removes (the search stops within 3 % of the amount, or at the closest plan "
              "it found). Predicted ms: the latency model; "
              "measured: the fresh-process timing (the model's reference was measured in-process, so the baseline's "
              "two numbers differ by the process and the noise)."]
    return "\n".join(lines)


def _ms(value) -> str:
    return "" if value is None else f"{value:.1f}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            results[key] = run_model(key, args, Path(tmp))
    for result in results.values():  # histories are long; keep the JSON readable
        for entry in result["runtimes"].values():
            for row in entry["rows"].values():
                row.pop("history", None)
    write_results(args.name, report(args, results, time.time() - started), {"args": vars(args), "models": results})


if __name__ == "__main__":
    main()
