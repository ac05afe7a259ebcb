"""What does a shunt cost and save? Params, MACs, latency and val mIoU of shunted MobileNetV3 models (issue 7).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/shunt_replacement.py --seeds 0 1 2

For each model (smp DeepLabV3Plus on tu-mobilenetv3_large_100, torchvision lraspp_mobilenet_v3_large): train
the original on SyntheticScenes, then, from its weights and per seed, fit with ShuntReplacement (blocks: auto,
the lowest-KQ range that removes --target of the parameters; stage A --stage_a_epochs, stage B --stage_b_epochs
with ACE distillation from the original, taken by KnowledgeDistillation right before the splice). Reported per
model: the original's val mIoU, the same original fine-tuned for the same extra epochs without a shunt (control),
the shunted model right after stage A (the trained shunt spliced in, before any end-to-end fine-tuning) and after
stage B; the range chosen per seed; params, MACs (at --bench_size) and TorchScript-lite / ExecuTorch latency of
original vs shunted, measured in the same run. Every BatchNorm uses momentum 0.1 (torchvision's MobileNetV3
defaults to 0.01, too slow for training runs this short). The seed publication reports 28 % compression for
-3.52 mIoU (DeepLabV3 + MobileNetV3 on Cityscapes).
Prints a Markdown table and writes benchmarks/results/<--name>.{md,json}.
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
from _training import fit  # noqa: E402

from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network  # noqa: E402
from lightning_segcompress.callbacks import KnowledgeDistillation, ShuntReplacement  # noqa: E402

# torchvision's MobileNetV3 uses BN momentum 0.01: after a few hundred steps its running statistics still lag so far
# behind that eval-mode mIoU stays at chance (0.09 vs 0.48 in train mode after 3 epochs)
BN_MOMENTUM = 0.1
MODELS = {
    "DeepLabV3+ (mnv3-large)": {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}},
    "LR-ASPP (torchvision mnv3-large)": {"class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=96, help="training image size")
    parser.add_argument("--bench_size", type=int, default=512, help="latency input H = W")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--num_val", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the original")
    parser.add_argument("--stage_a_epochs", type=int, default=2)
    parser.add_argument("--stage_b_epochs", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.28, help="fraction of the parameters to remove")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--finetune_lr", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--name", default="shunt_replacement", help="result file name in benchmarks/results")
    return parser.parse_args()


def measure(network, args, folder: Path) -> dict:
    settings = BenchmarkSettings(input_shape=(1, 3, args.bench_size, args.bench_size),
                                 runtimes=("torchscript_lite", "executorch"), threads=args.threads, warmup=3,
                                 runs=args.runs)
    report = benchmark_network(network, settings, folder)
    return {"params": report["params"], "macs": report["macs"],
            **{f"{rt}_ms": entry.get("median_ms") for rt, entry in report["runtimes"].items()}}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f}..{max(values):.4f})"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label in args.models:
            spec = MODELS[label]
            original_miou, original = fit(args, spec, args.epochs, 100, args.lr, root / "original",
                                          bn_momentum=BN_MOMENTUM)
            weights = {k: v.clone() for k, v in original.state_dict().items()}
            extra = args.stage_a_epochs + args.stage_b_epochs
            control_miou, _ = fit(args, spec, extra, 0, args.finetune_lr, root / "control", weights=weights,
                                 bn_momentum=BN_MOMENTUM)
            print(f"{label}: original {original_miou:.4f}, +{extra} epochs without shunt {control_miou:.4f}",
                  flush=True)
            runs = []
            for seed in args.seeds:
                cb = ShuntReplacement(blocks="auto", target={"params": args.target}, stage_a_epochs=args.stage_a_epochs,
                                      eval_batches=args.num_val // args.batch_size, input_size=[args.size, args.size])
                kd = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
                                           losses={"ace": {"kappa": 0.3}}, input_size=[args.size, args.size])
                miou, shunted = fit(args, spec, extra, seed, args.finetune_lr, root / f"shunt-{seed}", [cb, kd],
                                    weights, BN_MOMENTUM)
                runs.append({"seed": seed, "range": cb.plan.describe(), "stage_a_miou": cb.scores["stage_a_miou"],
                             "original_on_kq_batches": cb.scores["original_miou"], "stage_b_miou": miou,
                             "quotients": cb.quotients, "net": shunted.net})
                print(f"  seed {seed}: {cb.plan.describe()}; after stage A {cb.scores['stage_a_miou']:.4f}, after "
                      f"stage B {miou:.4f}", flush=True)
            before = measure(original.net, args, root / "bench-original")
            after = measure(runs[0]["net"], args, root / "bench-shunted")
            for run in runs:
                run.pop("net")
            results[label] = {"original_miou": original_miou, "control_miou": control_miou, "runs": runs,
                              "original": before, "shunted": after}
    header = (f"SyntheticScenes {args.size}x{args.size}, {args.classes} classes, {args.num_train} train / "
              f"{args.num_val} val images, batch {args.batch_size}; original {args.epochs} epochs (AdamW lr "
              f"{args.lr}), "
              f"then {args.stage_a_epochs} + {args.stage_b_epochs} epochs (lr {args.finetune_lr}) from its weights; "
              f"blocks: auto, target {args.target:.0%} of the parameters, arch1 shunt, ACE kappa 0.3; seeds "
              f"{args.seeds}; latency at {args.bench_size}x{args.bench_size} (seed {args.seeds[0]}'s range), "
              f"{args.threads} threads, median of {args.runs}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}; {time.time() - started:.0f} s.")
    lines = [header, "", "| model | original | +epochs, no shunt | after stage A | after stage B | drop vs control | "
             "params | MACs | lite ms | ExecuTorch ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        a = [run["stage_a_miou"] for run in r["runs"]]
        b = [run["stage_b_miou"] for run in r["runs"]]
        o, s = r["original"], r["shunted"]

        def ratio(key, o=o, s=s):
            return f"{o[key]:.1f} -> {s[key]:.1f} ({o[key] / s[key]:.2f}x faster)" if o.get(key) and s.get(key) \
                else "n/a"

        lines.append(f"| {label} | {r['original_miou']:.4f} | {r['control_miou']:.4f} | {spread(a)} | {spread(b)} | "
                     f"{(statistics.mean(b) - r['control_miou']) * 100:+.2f} pts | {o['params']:,} -> {s['params']:,} "
                     f"(-{1 - s['params'] / o['params']:.1%}) | -{1 - s['macs'] / o['macs']:.1%} | "
                     f"{ratio('torchscript_lite_ms')} | {ratio('executorch_ms')} |")
    lines += ["", "Ranges chosen (KQ measured on the validation batches of each run):", ""]
    for label, r in results.items():
        for run in r["runs"]:
            lines.append(f"- {label}, seed {run['seed']}: {run['range']}")
    lines += ["", "'after stage A' is measured on the validation set right after the splice (no end-to-end training "
              "yet); 'drop vs control' compares the mean after stage B with the original trained for the same extra "
              "epochs."]
    write_results(args.name, "\n".join(lines), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
