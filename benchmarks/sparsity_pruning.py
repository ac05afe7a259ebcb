"""Which pruning criterion keeps the most accuracy at 50 % fewer MACs? (issue 8, the accuracy-retention goal)

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparsity_pruning.py --seeds 0 1 2

For each architecture (smp DeepLabV3Plus on tu-mobilenetv3_small_100, smp Unet on resnet18) a baseline is
trained once on SyntheticScenes. Then, from its weights, per method and seed, the same schedule runs:
--sparse_epochs of training (with the method's SparsityRegularization, or plain for L2 magnitude), one
StructuredPruning step to --amount fewer MACs, --finetune_epochs of fine-tuning, without and with
KnowledgeDistillation from a snapshot of the network taken right before pruning. Methods: L2 magnitude,
slimming + bn_scale, ACSL + bn_scale, CAP + bn_scale, and PostPruning (--tolerance points) on top of the best
of those without KD; plus the baseline trained for the same extra epochs without pruning. Reports mean and
spread of the final val mIoU and the MACs reduction reached. Prints a
Markdown table and writes benchmarks/results/<--name>.{md,json}.
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

from lightning_segcompress.callbacks import (  # noqa: E402
    KnowledgeDistillation,
    PostPruning,
    SparsityRegularization,
    StructuredPruning,
)
from lightning_segcompress.utils import count_macs  # noqa: E402

ARCHITECTURES = {
    "DeepLabV3+ (mnv3-small)": {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_small_100"}},
    "Unet (resnet18)": {"class_path": "segmentation_models_pytorch.Unet", "init_args": {"encoder_name": "resnet18"}},
}
METHODS = {"L2 magnitude": None, "slimming + bn_scale": "slimming", "ACSL + bn_scale": "acsl",
           "CAP + bn_scale": "cap"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--num_train", type=int, default=128)
    parser.add_argument("--num_val", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--baseline_epochs", type=int, default=15)
    parser.add_argument("--sparse_epochs", type=int, default=2)
    parser.add_argument("--finetune_epochs", type=int, default=5)
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of MACs removed")
    parser.add_argument("--strength", type=float, default=1e-3, help="mean L1 strength on BN scales")
    parser.add_argument("--tolerance", type=float, default=0.5, help="post-pruning: points a group may cost")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--finetune_lr", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="sparsity_pruning", help="result file name in benchmarks/results")
    return parser.parse_args()


def compressed_run(args, spec, weights, seed, root, method, kd, post_pruning) -> dict:
    callbacks = []
    if method is not None:
        callbacks.append(SparsityRegularization(method=method, strength=args.strength, end_epoch=args.sparse_epochs,
                                                input_size=[args.size, args.size]))
    callbacks.append(StructuredPruning(amount=args.amount, target="macs",
                                       importance="l2" if method is None else "bn_scale",
                                       start_epoch=args.sparse_epochs, input_size=[args.size, args.size]))
    post = PostPruning(max_group_miou_drop=args.tolerance, eval_batches=args.num_val // args.batch_size,
                       input_size=[args.size, args.size]) if post_pruning else None
    if post is not None:
        callbacks.append(post)
    if kd:
        callbacks.append(KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression"))
    miou, model = fit(args, spec, args.sparse_epochs + args.finetune_epochs, seed, args.finetune_lr, root, callbacks,
                      weights)
    example = torch.zeros(1, 3, args.size, args.size)
    run = {"miou": miou, "macs": count_macs(model.net.eval(), example)}
    if post is not None:
        run["undone_groups"] = sum(g["undone"] for step in post.steps for g in step["groups"])
    return run


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in args.architectures:
            spec = ARCHITECTURES[arch]
            baseline, model = fit(args, spec, args.baseline_epochs, 100, args.lr, root / "baseline")
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            base_macs = count_macs(model.net.eval(), torch.zeros(1, 3, args.size, args.size))
            rows = {}
            control = [fit(args, spec, args.sparse_epochs + args.finetune_epochs, seed, args.finetune_lr,
                           root / f"control-{seed}", weights=weights)[0] for seed in args.seeds]
            rows[("no pruning (same epochs)", False)] = [{"miou": m, "macs": base_macs} for m in control]
            print(f"{arch} | no pruning: {[round(m, 4) for m in control]}", flush=True)
            for label, method in METHODS.items():
                for kd in (False, True):
                    runs = [compressed_run(args, spec, weights, seed, root / f"{label}-{kd}-{seed}", method, kd, False)
                            for seed in args.seeds]
                    rows[(label, kd)] = runs
                    print(f"{arch} | {label} | KD {kd}: {[round(r['miou'], 4) for r in runs]}", flush=True)
            best = max(METHODS, key=lambda m: statistics.mean(r["miou"] for r in rows[(m, False)]))
            for kd in (False, True):
                runs = [compressed_run(args, spec, weights, seed, root / f"post-{kd}-{seed}", METHODS[best], kd, True)
                        for seed in args.seeds]
                rows[(f"post-pruning on {best}", kd)] = runs
                print(f"{arch} | post-pruning on {best} | KD {kd}: {[round(r['miou'], 4) for r in runs]}", flush=True)
            results[arch] = {"baseline_miou": baseline, "baseline_macs": base_macs, "best": best, "rows": [
                {"method": label, "kd": kd, "miou": summary([r["miou"] for r in runs]),
                 "macs_reduction": summary([1 - r["macs"] / base_macs for r in runs]),
                 "undone_groups": [r.get("undone_groups") for r in runs]}
                for (label, kd), runs in rows.items()]}
    header = (f"SyntheticScenes {args.size}x{args.size}, {args.classes} classes, {args.num_train} train / "
              f"{args.num_val} val images, batch {args.batch_size}; baseline {args.baseline_epochs} epochs (AdamW lr "
              f"{args.lr}); then from its weights {args.sparse_epochs} epochs (sparsity strength {args.strength}) + "
              f"one pruning step to -{args.amount:.0%} MACs + {args.finetune_epochs} epochs fine-tuning (lr "
              f"{args.finetune_lr}), KD = pixel KL from the network right before pruning; post-pruning tolerance "
              f"{args.tolerance} points; seeds {args.seeds}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, {args.threads} threads; {time.time() - started:.0f} s.")
    lines = [header, ""]
    for arch, r in results.items():
        lines += [f"### {arch}: baseline val mIoU {r['baseline_miou']:.4f}", "",
                  "| method | KD | val mIoU mean | min .. max | stdev | vs baseline (points) | MACs removed |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            m = row["miou"]
            lines.append(f"| {row['method']} | {'yes' if row['kd'] else 'no'} | {m['mean']:.4f} | {m['min']:.4f} .. "
                         f"{m['max']:.4f} | {m['stdev']:.4f} | {(m['mean'] - r['baseline_miou']) * 100:+.2f} | "
                         f"{row['macs_reduction']['mean']:.1%} |")
        lines.append("")
    write_results(args.name, "\n".join(lines), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
