"""What does KnowledgeDistillation cost per training step? KD step vs plain step vs one teacher forward.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distillation_overhead.py --rounds 5

Times real Lightning training steps (forward, backward, optimizer step; from on_train_batch_start to
on_train_batch_end) of a student (smp DeepLabV3Plus on tu-mobilenetv3_small_100) without KD and with each KD
loss, and a no-grad eval-mode forward of the teacher (DeepLabV3Plus on tu-mobilenetv3_large_100) on the same
batch. Every round runs all variants in a shuffled order, so machine drift hits them alike; each keeps its
median step after warm-up. The ratio is computed per round and the table reports its median over rounds. A
control runs the teacher's forward inside each plain step (no loss): KD step / control is what the
distillation code itself adds. Goal (issue 5):
step_kd <= (step_plain + teacher_forward) x 1.05. Prints a Markdown table and writes
benchmarks/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _results import write_results  # noqa: E402
from distillation_accuracy import STUDENT, TEACHER  # noqa: E402 - the same teacher and student

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.callbacks import KnowledgeDistillation  # noqa: E402
from lightning_segcompress.models import build_network  # noqa: E402

VARIANTS = {"pixel KL": {"pixel_kl": {}}, "CWD": {"cwd": {}}, "ACE": {"ace": {}},
            "pixel KL + CWD + ACE": {"pixel_kl": {}, "cwd": {}, "ace": {}}}


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


class TeacherInStep(pl.Callback):
    """Control: the teacher's no-grad forward on every training batch, no loss (what KD cannot avoid)."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.teacher = teacher

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            self.teacher(batch[0])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="distillation_overhead", help="result file name in benchmarks/results")
    return parser.parse_args()


def step_time(args, callbacks: list) -> float:
    """Median training-step seconds of one short fit."""
    pl.seed_everything(0, verbose=False)
    steps = args.warmup + args.steps
    data = SyntheticScenesDataModule(num_classes=args.classes, image_size=(args.size, args.size),
                                     num_train=steps * args.batch_size, num_val=args.batch_size,
                                     batch_size=args.batch_size, seed=0)
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer, *callbacks])  # the timer starts before any callback works
    trainer.fit(SegmentationModule(STUDENT, num_classes=args.classes), data)
    return statistics.median(timer.times[args.warmup:])


def teacher_forward_time(args, teacher: torch.nn.Module) -> float:
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            teacher(x)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    teacher = build_network(TEACHER, num_classes=args.classes).eval()
    samples: dict[str, list[float]] = {"plain step": [], "teacher forward": [], "plain step + teacher in step": [],
                                       **{name: [] for name in VARIANTS}}
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    to_control: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(samples)
    shuffler = random.Random(0)
    for round_index in range(args.rounds):
        shuffler.shuffle(order)  # no variant always runs first or last in a round (machine drift)
        for name in order:
            if name == "plain step":
                samples[name].append(step_time(args, []))
            elif name == "teacher forward":
                samples[name].append(teacher_forward_time(args, teacher))
            elif name == "plain step + teacher in step":
                samples[name].append(step_time(args, [TeacherInStep(teacher)]))
            else:
                samples[name].append(step_time(args, [KnowledgeDistillation(teacher=teacher, losses=VARIANTS[name])]))
        budget = samples["plain step"][-1] + samples["teacher forward"][-1]
        for name in VARIANTS:
            ratios[name].append(samples[name][-1] / budget)
            to_control[name].append(samples[name][-1] / samples["plain step + teacher in step"][-1])
        print(f"round {round_index}: " + ", ".join(f"{k} {v[-1] * 1000:.1f} ms" for k, v in samples.items()),
              flush=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    rows = [{"variant": name, "median_s": medians[name], "per_round_s": samples[name],
             "ratio_to_plain_plus_teacher": statistics.median(ratios[name]) if name in VARIANTS else None,
             "ratio_per_round": ratios.get(name),
             "ratio_to_control": statistics.median(to_control[name]) if name in VARIANTS else None}
            for name in samples]
    header = (f"Lightning training step of DeepLabV3+(mnv3-small) on SyntheticScenes {args.size}x{args.size}, batch "
              f"{args.batch_size}, {args.classes} classes, teacher DeepLabV3+(mnv3-large); medians of {args.steps} "
              f"steps per fit after {args.warmup} warm-up; times: median over {args.rounds} rounds (variants in "
              f"shuffled order), ratio: median of the per-round ratios; goal: KD step "
              f"/ (plain step + teacher forward) <= 1.05; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, {args.threads} threads; {time.time() - started:.0f} s.")
    lines = [header, "", "| variant | time (ms) | KD step / (plain + teacher) | KD step / (plain + teacher in step) |",
             "|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["ratio_to_plain_plus_teacher"] is None else f"{r['ratio_to_plain_plus_teacher']:.3f}"
        control = "" if r["ratio_to_control"] is None else f"{r['ratio_to_control']:.3f}"
        lines.append(f"| {r['variant']} | {r['median_s'] * 1000:.1f} | {ratio} | {control} |")
    write_results(args.name, "\n".join(lines), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
