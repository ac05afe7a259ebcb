"""How much accuracy does compression cost, and which recovery keeps it? (issue 20)

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_retention.py --seeds 0 1 2

Per dataset (PhotoTextures: real photographs; SyntheticScenes) and architecture, a baseline is trained once
(--baseline_epochs, seed 100). From its weights every row trains --epochs more epochs with the same data, LR and
seeds; rows differ only in the compression callbacks:

  no compression        the equal-epochs control
  prune                 StructuredPruning(amount=--amount of MACs, L2, one step at --prune_epoch)
  prune + LR rewind     the same with lr_rewind_epoch=0 (Renda et al. 2020)
  prune + KD <loss>     the same with KnowledgeDistillation from the network right before pruning, one row per
                        loss set: pixel KL, CWD, pixel KL + IFVD, pixel KL + CIRKD (pixel-to-pixel +
                        pixel-to-region), as the IFVD and CIRKD papers add them to logit KD; default weights
  <slimming|ACSL|CAP>   SparsityRegularization for epochs 0..prune_epoch-1, then bn_scale pruning to the same MACs
  budget 1 point        StructuredPruning up to --amount in 4 linear steps with max_miou_drop=1.0
  best + int8           the best pruning row (by mean) + QuantizationAwareTraining (fx, x86) for the last
                        --qat_epochs epochs: 2x fewer MACs + int8

Seeds vary the fine-tuning (data order, new layers), not the baseline. Every row's mIoU is measured on the whole
validation set by per-image confusion matrices; the table gives mean and 95 % Student-t CI over seeds, the paired
difference to the control (and for recovery rows, to plain pruning) with its CI over seeds, and, from seed
--bootstrap_seed alone, the paired-bootstrap 95 % CI over validation images. A CI that covers 0 is reported as
"no measurable difference". Below the table: paired differences of the sparsity methods (vs slimming, vs L2
pruning) and of int8 vs its float row. Writes benchmarks/results/<--name>.{md,json}; --from_json re-renders
a result file's tables without training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _results import write_results  # noqa: E402
from _stats import difference_row, mean_with_ci  # noqa: E402
from _training import fit  # noqa: E402

from lightning_segcompress import PhotoTexturesDataModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.callbacks import (  # noqa: E402
    KnowledgeDistillation,
    QuantizationAwareTraining,
    SparsityRegularization,
    StructuredPruning,
)
from lightning_segcompress.utils import count_macs  # noqa: E402
from lightning_segcompress.utils.statistics import (  # noqa: E402
    miou_from_confusion,
    paired_bootstrap,
    per_class_iou,
    per_image_confusion,
)

ARCHITECTURES = {
    "DeepLabV3+ (mnv3-large)": {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}},
    "Unet (resnet18)": {"class_path": "segmentation_models_pytorch.Unet", "init_args": {"encoder_name": "resnet18"}},
}
DATASETS = {"photo_textures": PhotoTexturesDataModule, "synthetic_scenes": SyntheticScenesDataModule}
KD_LOSSES = {"pixel KL": {"pixel_kl": {}}, "CWD": {"cwd": {}}, "pixel KL + IFVD": {"pixel_kl": {}, "ifvd": {}},
             "pixel KL + CIRKD": {"pixel_kl": {}, "cirkd_pixel": {}, "cirkd_region": {}}}
SPARSITY = {"slimming": "slimming", "ACSL": "acsl", "CAP": "cap"}
CONTROL, PRUNE = "no compression", "prune"
ROWS = [CONTROL, PRUNE, "prune + LR rewind", *[f"prune + KD {k}" for k in KD_LOSSES],
        *[f"{k} + bn_scale prune" for k in SPARSITY], "budget 1 point", "best + int8"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="rows to run (control always runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--num_train", type=int, default=128)
    parser.add_argument("--num_val", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--baseline_epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every row after the baseline")
    parser.add_argument("--prune_epoch", type=int, default=2)
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of MACs removed")
    parser.add_argument("--strength", type=float, default=1e-3, help="mean L1 strength on BN scales")
    parser.add_argument("--qat_epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--finetune_lr", type=float, default=0.001)
    parser.add_argument("--bootstrap_seed", type=int, default=0, help="the seed whose run gets bootstrap CIs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="accuracy_retention", help="result file name in benchmarks/results")
    parser.add_argument("--from_json", help="re-render the tables of this result file instead of training")
    args = parser.parse_args()
    if not 0 < args.prune_epoch < args.epochs - 1:
        parser.error("--prune_epoch must leave sparsity epochs before it and fine-tuning epochs after it.")
    return args


def data_module(args, dataset: str):
    return DATASETS[dataset](num_classes=args.classes, image_size=(args.size, args.size), num_train=args.num_train,
                             num_val=args.num_val, num_test=args.num_val, batch_size=args.batch_size, seed=0)


def pruning(args, **overrides) -> StructuredPruning:
    kwargs = dict(amount=args.amount, target="macs", importance="l2", start_epoch=args.prune_epoch,
                  input_size=[args.size, args.size])
    return StructuredPruning(**{**kwargs, **overrides})


def callbacks_for(args, row: str, best: str | None) -> list:
    if row == CONTROL:
        return []
    if row == PRUNE:
        return [pruning(args)]
    if row == "prune + LR rewind":
        return [pruning(args, lr_rewind_epoch=0)]
    if row.startswith("prune + KD "):
        return [pruning(args), KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
                                                     losses=KD_LOSSES[row.removeprefix("prune + KD ")])]
    if row.endswith(" + bn_scale prune"):
        method = SPARSITY[row.removesuffix(" + bn_scale prune")]
        return [SparsityRegularization(method=method, strength=args.strength, end_epoch=args.prune_epoch,
                                       input_size=[args.size, args.size]),
                pruning(args, importance="bn_scale")]
    if row == "budget 1 point":
        return [pruning(args, schedule="linear", steps=4, end_epoch=args.prune_epoch + 4, max_miou_drop=1.0,
                        eval_batches=None)]
    if row == "best + int8":
        return [*callbacks_for(args, best, None),
                QuantizationAwareTraining(backend="fx", engine="x86", start_epoch=args.epochs - args.qat_epochs,
                                          input_size=[args.size, args.size])]
    raise ValueError(row)


def run(args, spec, data, weights, row, best, seed, root) -> dict:
    callbacks = callbacks_for(args, row, best)
    _, model = fit(args, spec, args.epochs, seed, args.finetune_lr, root, callbacks, weights, data=data)
    network = model.net.eval()
    data.setup("validate")
    batches = [(images, masks) for images, masks in data.val_dataloader()]
    confusion = per_image_confusion(network, batches, args.classes)
    result = {"miou": miou_from_confusion(confusion), "confusion": confusion}
    if "int8" not in row:  # torch-pruning counts no MACs in a converted int8 graph; its architecture is the float one
        result["macs"] = count_macs(network, torch.zeros(1, 3, args.size, args.size))
    budget = next((c.budget for c in callbacks if isinstance(c, StructuredPruning) and c.budget is not None), None)
    if budget is not None:
        summary = budget.summary()
        result["budget"] = {"achieved_fraction": summary["achieved_fraction"],
                            "stopped_at_step": summary["stopped_at_step"], "checks": summary["checks"]}
    return result


def row_summary(args, runs: dict[int, dict], control: dict[int, dict], prune: dict[int, dict] | None,
                base_macs: int) -> dict:
    seeds = sorted(runs)
    values = [runs[s]["miou"] for s in seeds]
    out = {"per_seed": values, "miou": mean_with_ci(values, 2, 100),
           "vs_control": difference_row([control[s]["miou"] for s in seeds], values, 2, 100)}
    if prune is not None:
        out["vs_prune"] = difference_row([prune[s]["miou"] for s in seeds], values, 2, 100)
    b = args.bootstrap_seed if args.bootstrap_seed in runs else seeds[0]
    boot = paired_bootstrap(control[b]["confusion"], runs[b]["confusion"])
    out["bootstrap_vs_control"] = {"seed": b, "estimate": boot.estimate, "low": boot.low, "high": boot.high,
                                   "verdict": boot.verdict}
    out["per_class_iou_seed"] = [float(v) for v in per_class_iou(runs[b]["confusion"].sum(0))]
    macs = [runs[s]["macs"] for s in seeds if "macs" in runs[s]]
    out["macs_removed"] = 1 - statistics.mean(macs) / base_macs if macs else None
    if any("budget" in runs[s] for s in seeds):
        out["budget"] = [runs[s].get("budget") for s in seeds]
    return out


def main() -> None:
    args = parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        report(argparse.Namespace(**{**data["args"], "from_json": None}), data["results"], data["seconds"])
        return
    torch.set_num_threads(args.threads)
    started = time.time()
    results: dict[str, dict] = {}
    rows = [CONTROL] + [r for r in ROWS if r in args.rows and r != CONTROL]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dataset in args.datasets:
            data = data_module(args, dataset)
            for arch in args.architectures:
                key = f"{dataset} | {arch}"
                spec = ARCHITECTURES[arch]
                baseline, model = fit(args, spec, args.baseline_epochs, 100, args.lr, root / "baseline", data=data)
                weights = {k: v.clone() for k, v in model.state_dict().items()}
                base_macs = count_macs(model.net.eval(), torch.zeros(1, 3, args.size, args.size))
                print(f"{key} | baseline {baseline:.4f} ({time.time() - started:.0f} s)", flush=True)
                runs: dict[str, dict[int, dict]] = {}
                results[key] = {"baseline_miou": baseline, "baseline_macs": base_macs, "rows": {}}
                for row in rows:
                    best = None
                    if row == "best + int8":
                        pruned = [r for r in runs if r != CONTROL and not r.startswith("budget")]
                        best = max(pruned, key=lambda r: statistics.mean(x["miou"] for x in runs[r].values()))
                    label = f"{row} ({best})" if best else row
                    try:
                        runs[label] = {seed: run(args, spec, data, weights, row, best, seed, root / f"{row}-{seed}")
                                       for seed in args.seeds}
                    except Exception as err:  # noqa: BLE001 - a failed row is reported, the others still run
                        results[key]["rows"][label] = {"error": f"{type(err).__name__}: {err}"}
                        print(f"{key} | {label}: FAILED {err}", flush=True)
                        continue
                    print(f"{key} | {label}: {[round(r['miou'], 4) for r in runs[label].values()]} "
                          f"({time.time() - started:.0f} s)", flush=True)
                    prune = runs.get(PRUNE) if row.startswith(("prune +", "best")) else None
                    results[key]["rows"][label] = row_summary(args, runs[label], runs[CONTROL], prune, base_macs)
                    report(args, results, time.time() - started)


COMPARISONS = [("ACSL + bn_scale prune", "slimming + bn_scale prune"),
               ("CAP + bn_scale prune", "slimming + bn_scale prune"),
               *[(f"{k} + bn_scale prune", PRUNE) for k in SPARSITY]]


def comparisons(rows: dict) -> list[str]:
    """Paired-by-seed differences between rows that the main table does not set side by side."""
    pairs = list(COMPARISONS) + [(row, row.split("(")[1].rstrip(")")) for row in rows if row.startswith("best + int8")]
    lines = []
    for a, b in pairs:
        if a in rows and b in rows and "per_seed" in rows[a] and "per_seed" in rows[b]:
            diff = difference_row(rows[b]["per_seed"], rows[a]["per_seed"], 2, 100)
            lines.append(f"- {a} minus {b}: {diff['text']} points, {diff['verdict']}")
    return lines


def report(args, results: dict, seconds: float) -> None:
    lines = [header(args, seconds), ""]
    for key, r in results.items():
        lines += [f"### {key}: baseline val mIoU {r['baseline_miou']:.4f} (before the {args.epochs} epochs)", "",
                  "| row | val mIoU (points) mean [95% CI] | vs control, over seeds | verdict | vs prune, over seeds | "
                  "bootstrap vs control (1 run) | MACs removed |", "|---|---|---|---|---|---|---|"]
        for row, s in r["rows"].items():
            if "error" in s:
                lines.append(f"| {row} | failed: {s['error'][:200]} | | | | | |")
                continue
            control = s["vs_control"]
            prune = s.get("vs_prune")
            boot = s["bootstrap_vs_control"]
            macs = "" if s["macs_removed"] is None else f"{s['macs_removed']:.1%}"
            if s.get("budget"):
                macs += " (budget: " + ", ".join(f"{b['achieved_fraction']:.0%}" for b in s["budget"] if b) + ")"
            lines.append(f"| {row} | {s['miou']} | {control['text']} | {control['verdict']} | "
                         f"{prune['text'] + ' ' + prune['verdict'] if prune else ''} | {boot['estimate']:+.2f} "
                         f"[{boot['low']:+.2f}, {boot['high']:+.2f}] {boot['verdict']} | {macs} |")
        extra = comparisons(r["rows"])
        lines += ["", "Paired differences over seeds:", *extra] if extra else []
        lines.append("")
    write_results(args.name, "\n".join(lines), {"args": vars(args), "results": results, "seconds": seconds})


def header(args, seconds: float) -> str:
    return (f"{args.size}x{args.size}, {args.classes} classes, {args.num_train} train / {args.num_val} val images, "
            f"batch {args.batch_size}; baseline {args.baseline_epochs} epochs (AdamW lr {args.lr}, seed 100), then "
            f"every row {args.epochs} epochs from its weights (lr {args.finetune_lr}, poly decay); pruning to "
            f"-{args.amount:.0%} MACs at epoch {args.prune_epoch}; sparsity strength {args.strength} before it; "
            f"QAT fx/x86 for the last {args.qat_epochs} epochs of the int8 row; seeds {args.seeds} (mean [95 % "
            f"Student-t CI]); differences in mIoU points, paired by seed; bootstrap: 1000 paired resamples of the "
            f"validation images of seed {args.bootstrap_seed}. Machine: {platform.machine()}, {os.cpu_count()} "
            f"CPUs, torch {torch.__version__}, {args.threads} threads; {seconds:.0f} s.")


if __name__ == "__main__":
    main()
