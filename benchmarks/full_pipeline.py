"""P3: recipes/full_pipeline.yaml (teacher snapshot -> AGP structured pruning with KD -> QAT -> int8) on
SyntheticScenes with DeepLabV3+ (MobileNetV3-large), measured at 1x3x512x512 on TorchScript lite and ExecuTorch.

Three runs of the recipe through the `segcompress` CLI, each in a fresh process:
  fx       the recipe as written (QAT backend fx: int8 for TorchScript lite); a checkpoint is kept at the end of the
           last float epoch;
  pt2e     resumes that checkpoint with QAT backend pt2e (int8 for ExecuTorch/XNNPACK): the same baseline, teacher and
           pruned network, only the quantization differs;
  control  the same data and epochs without any compression: the uncompressed model at equal training.
Goal: >= 8x smaller, >= 4x faster, <= 1.0 mIoU points lost against the baseline.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/full_pipeline.py            # ~ see README for time and machine
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "full_pipeline.yaml"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--prune_epochs", type=int, nargs=2, default=[10, 13], help="first and last pruning epoch")
    parser.add_argument("--qat_start", type=int, default=20)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--num_val", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--amount", type=float, default=None, help="pruning amount (default: the recipe's)")
    parser.add_argument("--target", default=None, help="pruning target: macs | params (default: the recipe's)")
    parser.add_argument("--max_layer_fraction", type=float, default=None,
                        help="most of one layer's channels pruning may remove (default: the recipe's)")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--no_pt2e", action="store_true", help="skip the pt2e run (needs torchao and executorch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--root", default="/tmp/segcompress_full_pipeline")
    parser.add_argument("--name", default="full_pipeline")
    return parser.parse_args()


def recipe_config(args, root: Path, backend: str | None) -> dict:
    """The recipe scaled to this benchmark; ``backend=None``: every compression callback removed (control)."""
    config = yaml.safe_load(RECIPE.read_text())
    trainer = config["trainer"]
    trainer.update(max_epochs=args.epochs, default_root_dir=str(root), enable_progress_bar=False)
    config["data"]["init_args"].update(image_size=[args.image_size] * 2, num_train=args.num_train,
                                       num_val=args.num_val, batch_size=args.batch_size, num_workers=args.num_workers)
    callbacks = []
    for callback in trainer["callbacks"]:
        name, init = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
        if name == "ModelCheckpoint":  # the end of the last float epoch, for the pt2e run to resume from
            init.clear()
            init.update(dirpath=str(root / "checkpoints"), filename="pre_qat", every_n_epochs=args.qat_start,
                        save_top_k=1)
        elif backend is None:
            continue
        elif name == "StructuredPruning":
            init.update(start_epoch=args.prune_epochs[0], end_epoch=args.prune_epochs[1] + 1)
            if args.amount is not None:
                init["amount"] = args.amount
            if args.target is not None:
                init["target"] = args.target
            if args.max_layer_fraction is not None:
                init["max_layer_fraction"] = args.max_layer_fraction
        elif name == "QuantizationAwareTraining":
            init.update(backend=backend, start_epoch=args.qat_start,
                        freeze_bn_epoch=min(args.qat_start + 2, args.epochs - 1),
                        freeze_observer_epoch=min(args.qat_start + 3, args.epochs - 1))
        elif name == "DeviceBenchmark":
            init.update(threads=args.threads, runs=args.runs, output_dir=str(root / "benchmark"),
                        runtimes=["executorch"] if backend == "pt2e" else ["torchscript_lite", "executorch"])
        callbacks.append(callback)
    trainer["callbacks"] = callbacks
    return config


def run(config: dict, root: Path, extra: list[str] = ()) -> tuple[str, float]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lightning_segcompress.cli", "fit", "--config", str(path), *extra],
                            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    (root / "log.txt").write_text(result.stdout + "\n" + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"run in {root} failed:\n{result.stderr[-3000:]}")
    return result.stdout, time.perf_counter() - start


def final_miou(stdout: str) -> float:
    return float(re.search(r"val_miou = ([0-9.]+)", stdout).group(1))


def gpu_name() -> str:
    import torch

    return f", trained on {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""


def torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    args = parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    _, fx_seconds = run(recipe_config(args, root / "fx", "fx"), root / "fx")
    checkpoint = root / "fx" / "checkpoints" / "pre_qat.ckpt"
    pt2e_seconds = None
    if not args.no_pt2e:
        _, pt2e_seconds = run(recipe_config(args, root / "pt2e", "pt2e"), root / "pt2e",
                              [f"--ckpt_path={checkpoint}"])
    control_out, control_seconds = run(recipe_config(args, root / "control", None), root / "control")
    fx = json.loads((root / "fx" / "benchmark" / "benchmark.json").read_text())
    pt2e = None if args.no_pt2e else json.loads((root / "pt2e" / "benchmark" / "benchmark.json").read_text())
    control = final_miou(control_out)

    baseline = fx["stages"]["baseline"]
    rows, data = [], {"args": vars(args), "seconds": {"fx": fx_seconds, "pt2e": pt2e_seconds,
                                                      "control": control_seconds,
                                                      "total": time.perf_counter() - started},
                      "control_miou": control, "stages": {"fx": fx["stages"], "pt2e": pt2e and pt2e["stages"]}}
    entries = [("baseline (float, before pruning)", baseline, ("torchscript_lite", "executorch")),
               ("pruned + KD (float)", fx["stages"]["after_structured_pruning"], ("torchscript_lite", "executorch")),
               ("pruned + KD + QAT fx int8", fx["stages"]["final"], ("torchscript_lite",))]
    if pt2e is not None:
        entries.append(("pruned + KD + QAT pt2e int8", pt2e["stages"]["final"], ("executorch",)))
    goals = {}
    for label, stage, runtimes in entries:
        for runtime in runtimes:
            entry = stage["report"]["runtimes"][runtime]
            before = baseline["report"]["runtimes"][runtime]
            ok = entry.get("status") == "ok" and before.get("status") == "ok"
            speedup = before["median_ms"] / entry["median_ms"] if ok else None
            smaller = before["size_mb"] / entry["size_mb"] if ok else None
            drop = 100 * (baseline["miou"] - stage["miou"])
            drop_control = 100 * (control - stage["miou"])
            if "int8" in label:
                goals[runtime] = {"x_smaller": smaller, "speedup": speedup, "drop": drop, "drop_control": drop_control}
            # torch-pruning counts no MACs in a PT2E int8 graph: its architecture is the pruned float one
            macs = stage["report"]["macs"] or fx["stages"]["after_structured_pruning"]["report"]["macs"]
            rows.append(f"| {label} | {runtime} | {stage['miou']:.4f} | {drop:+.2f} | {drop_control:+.2f} | "
                        f"{stage['report']['params'] / 1e6:.3f} | {macs / 1e9:.3f} | "
                        + (f"{entry['median_ms']:.1f} | {entry['size_mb']:.2f} | {speedup:.2f}x | {smaller:.2f}x |"
                           if ok else f"{entry.get('status')} | | | |"))
    data["goals"] = goals
    verdicts = [f"- {runtime}: {g['x_smaller']:.2f}x smaller ({'met' if g['x_smaller'] >= 8 else 'missed'}), "
                f"{g['speedup']:.2f}x faster ({'met' if g['speedup'] >= 4 else 'missed'}), mIoU {-g['drop']:+.2f} "
                f"points vs baseline ({'met' if g['drop'] <= 1.0 else 'missed'}), {-g['drop_control']:+.2f} vs the "
                f"equal-epochs control" for runtime, g in goals.items() if g["speedup"] is not None]
    settings = fx["settings"]
    text = "\n".join([
        f"SyntheticScenes {args.image_size}x{args.image_size}, 6 classes, {args.num_train} train / {args.num_val} val; "
        f"{args.epochs} epochs: baseline training to epoch {args.prune_epochs[0] - 1}, teacher snapshot, AGP pruning "
        f"(epochs {args.prune_epochs[0]}-{args.prune_epochs[1]}) with pixel-KD, fine-tuning, QAT from epoch "
        f"{args.qat_start}. Latency at 1x{'x'.join(map(str, settings['input_shape'][1:]))}, {settings['threads']} "
        f"threads, median of {settings['runs']} runs in a fresh process; machine: {os.uname().machine}, "
        f"{os.cpu_count()} CPUs{gpu_name()}, torch {torch_version()}. Wall time {data['seconds']['total']:.0f} s.",
        "Drop = baseline (or control) mIoU - this stage's, in points (negative = better); ratios are baseline / stage "
        "in the same runtime. Control: the same recipe without compression, same epochs: val mIoU "
        f"{control:.4f}.",
        "",
        "| stage | runtime | val mIoU | drop vs baseline | drop vs control | params M | GMACs | median ms | MB | "
        "speedup | x smaller |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "P3 goal (>= 8x smaller, >= 4x faster, <= 1.0 mIoU points lost):",
        *verdicts,
    ])
    write_results(args.name, text, data)
    for source, name in ((root / "fx" / "benchmark", "miou_vs_latency"), (root / "fx" / "benchmark", "samples"),
                         (root / "fx" / "benchmark", "channels_per_layer")):
        if (source / f"{name}.png").exists():
            shutil.copy(source / f"{name}.png", RESULTS / f"{args.name}_{name}.png")


if __name__ == "__main__":
    main()
