"""Is int8 worth it? fp32 vs int8 latency, file size and val mIoU on the same runtime, after QAT (issue 6, P2).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quantization_speedup.py --threads 2

For each model (smp DeepLabV3Plus on tu-mobilenetv3_large_100, smp Unet on resnet18): train in fp32 on
SyntheticScenes, then fine-tune with QuantizationAwareTraining twice from the same weights — backend fx
(int8 for the TorchScript lite interpreter) and backend pt2e (int8 for ExecuTorch/XNNPACK) — and validate the
converted int8 networks. The fp32 reference mIoU is the same fp32 model fine-tuned for the same epochs at
the same learning rate without fake quantization, so the drop measures quantization, not extra training.
Latency and file size come from the DeviceBenchmark path at --bench_size (fp32 and
int8 each on the runtime the backend targets, timed in a fresh subprocess). Goal: >= 3x faster, <= 0.3x file
size, <= 0.5 mIoU points drop. Prints a Markdown table and writes benchmarks/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _results import write_results  # noqa: E402

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network  # noqa: E402
from lightning_segcompress.benchmark.profile import float_islands_of, top_ops  # noqa: E402
from lightning_segcompress.benchmark.timing import cpu_description  # noqa: E402
from lightning_segcompress.callbacks import QuantizationAwareTraining  # noqa: E402

MODELS = {
    "DeepLabV3+ (mnv3-large)": {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}},
    "Unet (resnet18)": {"class_path": "segmentation_models_pytorch.Unet", "init_args": {"encoder_name": "resnet18"}},
}
RUNTIME = {"fx": "torchscript_lite", "pt2e": "executorch"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--backends", nargs="+", default=["fx", "pt2e"], choices=["fx", "pt2e"])
    parser.add_argument("--size", type=int, default=96, help="training crop")
    parser.add_argument("--bench_size", type=int, default=512, help="latency input H = W")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--num_val", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8, help="fp32 training epochs")
    parser.add_argument("--qat_epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--qat_lr", type=float, default=0.0003)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--name", default="quantization_speedup", help="result file name in benchmarks/results")
    return parser.parse_args()


def profile_summary(entry: dict, n: int = 3) -> dict:
    """The operator profile's top ``n`` ops, the ops computing in float (float islands, in an int8 model), the
    float<->int8 conversions and the ops outside the delegate, in ms per inference."""
    profile = entry.get("profile") or {}
    ops = profile.get("ops", []) if profile.get("status") == "ok" else []
    return {"top": [(o["op"], o["total_ms"], o["dtype"]) for o in top_ops(profile, n)],
            "float_ms": sum(o["total_ms"] for o in float_islands_of(ops)),
            "convert_ms": sum(o["total_ms"] for o in ops if o["op"].startswith(("Convert", "aten::quantize",
                                                                                "aten::dequantize"))),
            "not_delegated_ms": sum(o["total_ms"] for o in ops if o.get("delegated") is False)}


def top_text(summary: dict) -> str:
    return "; ".join(f"{op} {ms:.1f}" for op, ms, _ in summary["top"])


def data(args) -> SyntheticScenesDataModule:
    return SyntheticScenesDataModule(num_classes=args.classes, image_size=(args.size, args.size),
                                     num_train=args.num_train, num_val=args.num_val, num_test=args.num_val,
                                     batch_size=args.batch_size, seed=0)


def trainer(args, epochs: int, root: Path, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                      callbacks=list(callbacks))


def measure(network, runtime: str, args, out: Path) -> dict:
    settings = BenchmarkSettings(input_shape=(1, 3, args.bench_size, args.bench_size), runtimes=(runtime,),
                                 threads=args.threads, runs=args.runs, tolerance=1.0)
    entry = benchmark_network(network, settings, out)["runtimes"][runtime]
    if entry.get("status") != "ok":
        raise RuntimeError(f"{runtime} benchmark failed: {entry}")
    return entry


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.models:
            pl.seed_everything(0, verbose=False)
            float_model = SegmentationModule(MODELS[name], num_classes=args.classes, lr=args.lr)
            trainer(args, args.epochs, root).fit(float_model, data(args))
            # the fair fp32 reference gets the same extra epochs at the QAT learning rate, without fake quantization
            pl.seed_everything(0, verbose=False)
            tuned = SegmentationModule(MODELS[name], num_classes=args.classes, lr=args.qat_lr)
            tuned.load_state_dict(float_model.state_dict())
            tune = trainer(args, args.qat_epochs, root)
            tune.fit(tuned, data(args))
            float_miou = tune.validate(tuned, data(args), verbose=False)[0]["val_miou"]
            print(f"{name}: fp32 val mIoU {float_miou:.4f} after {args.epochs} + {args.qat_epochs} epochs", flush=True)
            for backend in args.backends:
                runtime = RUNTIME[backend]
                fp32 = measure(float_model.net, runtime, args, root / name / backend / "fp32")
                pl.seed_everything(0, verbose=False)
                model = SegmentationModule(MODELS[name], num_classes=args.classes, lr=args.qat_lr)
                model.load_state_dict(float_model.state_dict())
                last = args.qat_epochs - 1  # BN and observers frozen in the last QAT epoch (observers see one first)
                qat = QuantizationAwareTraining(backend=backend, start_epoch=0, freeze_bn_epoch=max(last, 0),
                                                freeze_observer_epoch=last if last > 0 else None,
                                                input_size=[args.size, args.size])
                fit = trainer(args, args.qat_epochs, root, [qat])
                fit.fit(model, data(args))
                int8_miou = fit.validate(model, data(args), verbose=False)[0]["val_miou"]
                int8 = measure(model.net, runtime, args, root / name / backend / "int8")
                row = {"model": name, "backend": backend, "runtime": runtime,
                       "fp32_ms": fp32["median_ms"], "int8_ms": int8["median_ms"],
                       "speedup": fp32["median_ms"] / int8["median_ms"],
                       "fp32_mb": fp32["size_mb"], "int8_mb": int8["size_mb"],
                       "size_ratio": int8["size_mb"] / fp32["size_mb"],
                       "fp32_miou": float_miou, "fake_quant_miou": qat.pre_int8_metric, "int8_miou": int8_miou,
                       "miou_drop_points": 100 * (float_miou - int8_miou),
                       "fp32_profile": profile_summary(fp32), "int8_profile": profile_summary(int8)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    header = (f"SyntheticScenes {args.size}x{args.size}, {args.classes} classes, {args.num_train} train / "
              f"{args.num_val} val; fp32 {args.epochs} epochs (AdamW lr {args.lr}), then QAT {args.qat_epochs} epochs "
              f"(lr {args.qat_lr}, BN and observers frozen in the last; the fp32 mIoU is after the same extra epochs "
              f"without fake quantization); latency at 1x3x{args.bench_size}x"
              f"{args.bench_size}, median of {args.runs} runs in a fresh process; machine: {platform.machine()}, "
              f"{os.cpu_count()} CPUs ({cpu_description()}), torch {torch.__version__}, {args.threads} threads; "
              f"{time.time() - started:.0f} s. Goal: >= 3x faster, <= 0.3x size, <= 0.5 mIoU points drop.")
    lines = [header, "", "| model | backend -> runtime | fp32 ms | int8 ms | speedup | fp32 MB | int8 MB | size "
             "ratio | fp32 mIoU | fake-quant mIoU | int8 mIoU | drop (points) |", "|---" * 12 + "|"]
    for r in rows:
        fake = "" if r["fake_quant_miou"] is None else f"{r['fake_quant_miou']:.4f}"
        lines.append(f"| {r['model']} | {r['backend']} -> {r['runtime']} | {r['fp32_ms']:.1f} | {r['int8_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['fp32_mb']:.2f} | {r['int8_mb']:.2f} | {r['size_ratio']:.2f} | "
                     f"{r['fp32_miou']:.4f} | {fake} | {r['int8_miou']:.4f} | {r['miou_drop_points']:+.2f} |")
    lines += ["", "Operator profile (ms per inference; ETDump inside XNNPACK for ExecuTorch, torch.profiler for lite): "
              "the top 3 ops, the time int8 still spends in float ops (float islands) and in float<->int8 "
              "conversions, and outside the delegate.", "",
              "| model | backend -> runtime | fp32 top ops | int8 top ops | int8 float islands ms | "
              "int8 conversions ms | not delegated ms (fp32 / int8) |", "|---" * 7 + "|"]
    for r in rows:
        f, q = r["fp32_profile"], r["int8_profile"]
        lines.append(f"| {r['model']} | {r['backend']} -> {r['runtime']} | {top_text(f)} | {top_text(q)} | "
                     f"{q['float_ms']:.1f} | {q['convert_ms']:.1f} | {f['not_delegated_ms']:.1f} / "
                     f"{q['not_delegated_ms']:.1f} |")
    write_results(args.name, "\n".join(lines), {"args": vars(args), "cpu": cpu_description(), "rows": rows})


if __name__ == "__main__":
    main()
