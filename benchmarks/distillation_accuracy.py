"""Does distillation help a small student? Val mIoU on SyntheticScenes with and without KD, several seeds.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distillation_accuracy.py --seeds 0 1 2

Trains a teacher (smp DeepLabV3Plus on tu-mobilenetv3_large_100) once, then the student (DeepLabV3Plus on
tu-mobilenetv3_small_100) for the same epochs without KD and with each of pixel KL, CWD and ACE (the
KnowledgeDistillation callback, teacher loaded from the teacher's checkpoint), per seed. Reports mean and
spread (min..max) of the final val mIoU. Prints a Markdown table and writes
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

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _results import write_results  # noqa: E402

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.callbacks import KnowledgeDistillation  # noqa: E402

TEACHER = {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
           "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}}
STUDENT = {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
           "init_args": {"encoder_name": "tu-mobilenetv3_small_100"}}
VARIANTS = {"no KD": None, "pixel KL": {"pixel_kl": {}}, "CWD": {"cwd": {}}, "ACE": {"ace": {}}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--num_val", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--teacher_epochs", type=int, default=12)
    parser.add_argument("--student_epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="distillation_accuracy", help="result file name in benchmarks/results")
    return parser.parse_args()


def data(args, seed: int = 0) -> SyntheticScenesDataModule:
    return SyntheticScenesDataModule(num_classes=args.classes, image_size=(args.size, args.size),
                                     num_train=args.num_train, num_val=args.num_val, num_test=args.num_val,
                                     batch_size=args.batch_size, seed=0)


def fit(network: dict, args, epochs: int, seed: int, callbacks: list, root: Path) -> tuple[float, SegmentationModule,
                                                                                              pl.Trainer]:
    pl.seed_everything(seed, verbose=False)
    model = SegmentationModule(network, num_classes=args.classes, lr=args.lr)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                         callbacks=callbacks)
    trainer.fit(model, data(args, seed))
    return float(trainer.callback_metrics["val_miou"]), model, trainer


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_miou, _, trainer = fit(TEACHER, args, args.teacher_epochs, 100, [], root / "teacher")
        teacher_ckpt = root / "teacher.ckpt"
        trainer.save_checkpoint(teacher_ckpt)
        print(f"teacher val mIoU {teacher_miou:.4f}", flush=True)
        runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for seed in args.seeds:
            for name, losses in VARIANTS.items():
                callbacks = [] if losses is None else [KnowledgeDistillation(teacher=str(teacher_ckpt), losses=losses)]
                miou, _, _ = fit(STUDENT, args, args.student_epochs, seed, callbacks, root / f"{name}-{seed}")
                runs[name].append(miou)
                print(f"seed {seed} {name}: val mIoU {miou:.4f}", flush=True)
    rows = []
    base = statistics.mean(runs["no KD"])
    for name, values in runs.items():
        mean = statistics.mean(values)
        rows.append({"student": name, "mean": mean, "min": min(values), "max": max(values),
                     "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "delta_vs_no_kd": mean - base,
                     "values": values})
    header = (f"SyntheticScenes {args.size}x{args.size}, {args.classes} classes, {args.num_train} train / "
              f"{args.num_val} val images, batch {args.batch_size}, AdamW lr {args.lr}; teacher DeepLabV3+(mnv3-large) "
              f"{args.teacher_epochs} epochs: val mIoU {teacher_miou:.4f}; student DeepLabV3+(mnv3-small) "
              f"{args.student_epochs} epochs, seeds {args.seeds}, loss defaults (pixel KL weight 10 T=1, CWD weight "
              f"3 T=4, ACE kappa 0.3); machine: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, {args.threads} threads; {time.time() - started:.0f} s.")
    lines = [header, "", "| student | val mIoU mean | min .. max | stdev | vs no KD | per seed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['mean']:.4f} | {r['min']:.4f} .. {r['max']:.4f} | {r['stdev']:.4f} | "
                     f"{r['delta_vs_no_kd']:+.4f} | {', '.join(f'{v:.4f}' for v in r['values'])} |")
    write_results(args.name, "\n".join(lines), {"args": vars(args), "teacher_miou": teacher_miou, "rows": rows})


if __name__ == "__main__":
    main()
