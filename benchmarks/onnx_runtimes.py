"""Every runtime side by side (issue 30): eager, TorchScript lite, ExecuTorch and ONNX Runtime on the same networks.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_runtimes.py --size 512 --threads 2 --runs 10

For smp DeepLabV3+ (MobileNetV3-large) and smp Unet (ResNet-18), random weights (seed 0), four stages: the
baseline, the baseline 2x pruned (L2 one-shot to 0.5 of the MACs, BatchNorm re-estimated on the calibration
images), and each of them as PT2E int8 (post-training quantization, XNNPACK quantizer, per-channel, calibrated on
``--calibration`` PhotoTextures training images at ``--size``). Each stage goes through ``benchmark_network`` on
every runtime in one run: export, output check against eager, latency in a fresh process (median of ``--runs``),
file size, the process's peak memory, the operator profile, and the val mIoU of the file itself on ``--eval``
PhotoTextures validation photographs next to eager's. The weights are random, so the mIoU columns measure how
faithfully each file reproduces eager (the gap), not a trained model's accuracy, and the int8 output check against
eager is off (``int8_agreement=0``: random logits are nearly tied). The int8 column of each runtime says, from the
operator profile, where its time goes: int8 kernels, float ops and Q/DQ conversions.

Prints a Markdown table and writes benchmarks/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _results import write_results  # noqa: E402

from lightning_segcompress import PhotoTexturesDataModule  # noqa: E402
from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network  # noqa: E402
from lightning_segcompress.benchmark.accuracy import EvalSet  # noqa: E402
from lightning_segcompress.benchmark.runtimes import get_runtime  # noqa: E402
from lightning_segcompress.benchmark.timing import cpu_description  # noqa: E402
from lightning_segcompress.models import build_network  # noqa: E402
from lightning_segcompress.pruning import PruningConfig, build_importance, measure, plan_step  # noqa: E402
from lightning_segcompress.pruning.state import prune_with_history  # noqa: E402
from lightning_segcompress.quantization import (  # noqa: E402
    QuantizationConfig,
    calibrate,
    convert_network,
    prepare_network,
)
from lightning_segcompress.utils.batchnorm import reestimate_batchnorm  # noqa: E402
from lightning_segcompress.utils.inspection import find_classifier_layers  # noqa: E402

MODELS = {
    "DeepLabV3+ (mnv3-large)": {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_large_100", "encoder_weights": None}},
    "Unet (resnet18)": {"class_path": "segmentation_models_pytorch.Unet",
                        "init_args": {"encoder_name": "resnet18", "encoder_weights": None}},
}
RUNTIMES = ("eager", "torchscript_lite", "executorch", "onnxruntime")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--amount", type=float, default=0.5, help="share of the MACs pruned")
    parser.add_argument("--calibration", type=int, default=8, help="calibration images (int8, BN re-estimation)")
    parser.add_argument("--eval", type=int, default=8, help="validation photographs scored per file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--name", default="onnx_runtimes", help="result file name in benchmarks/results")
    return parser.parse_args()


def photographs(args: argparse.Namespace) -> tuple[list[torch.Tensor], EvalSet]:
    data = PhotoTexturesDataModule(num_classes=args.classes, image_size=(args.size, args.size),
                                   num_train=max(args.calibration, 2), num_val=args.eval, batch_size=1)
    data.setup("fit")
    calibration = [batch[0] for _, batch in zip(range(args.calibration), data.train_dataloader())]
    evaluation = EvalSet.from_batches(list(data.val_dataloader()), (1, 3, args.size, args.size), data.ignore_index)
    return calibration, evaluation


def pruned(network: torch.nn.Module, example: torch.Tensor, amount: float,
           calibration: list[torch.Tensor]) -> tuple[torch.nn.Module, dict]:
    classifier = find_classifier_layers(network, example)
    reference = measure(network, example, ["macs"])["macs"]
    plan = plan_step(network, example, build_importance("l2"), "macs", amount, reference,
                     PruningConfig(ignored_layers=classifier, round_to=8))
    network = copy.deepcopy(network)
    prune_with_history(network, plan.history, example)
    reestimate_batchnorm(network, torch.cat(calibration).split(4))  # > 1 value per channel in pooled branches
    return network.eval(), {"macs_ratio": measure(network, example, ["macs"])["macs"] / reference}


def int8(network: torch.nn.Module, calibration: list[torch.Tensor]) -> torch.nn.Module:
    prepared = prepare_network(network, QuantizationConfig(backend="pt2e", qat=False, example_shape=(2, 3, 64, 64)))
    calibrate(prepared, calibration)
    return convert_network(prepared)


def where_int8_time_goes(profile: dict | None) -> str:
    """``int8 x % / float y % / Q-DQ z %`` of a profile's op time, and its most expensive float op."""
    if not profile or profile.get("status") != "ok":
        return "no profile"
    shares = {"int8": 0.0, "float": 0.0, None: 0.0}
    for op in profile["ops"]:
        shares[op.get("dtype")] = shares.get(op.get("dtype"), 0.0) + op["share"]
    floats = [o for o in profile["ops"] if o.get("dtype") == "float"]
    top = f"; top float op {floats[0]['op']} {floats[0]['share']:.0%}" if floats else ""
    return f"int8 {shares['int8']:.0%} / float {shares['float']:.0%} / conversions+other {shares[None]:.0%}{top}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    settings = BenchmarkSettings(input_shape=(1, 3, args.size, args.size), runtimes=tuple(args.runtimes),
                                 threads=args.threads, warmup=args.warmup, runs=args.runs, int8_agreement=0.0,
                                 memory=False, profile=True)
    calibration, evaluation = photographs(args)
    example = calibration[0]
    results: dict = {"machine": cpu_description(), "platform": platform.platform(), "torch": torch.__version__,
                     "args": vars(args), "models": {}}
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        network = build_network(MODELS[name], num_classes=args.classes).eval()
        started = time.perf_counter()
        small, info = pruned(network, example, args.amount, calibration)
        stages = {"baseline fp32": network, "baseline int8": int8(network, calibration),
                  f"pruned {args.amount:.0%} fp32": small, f"pruned {args.amount:.0%} int8": int8(small, calibration)}
        results["models"][name] = {"pruned": info, "stages": {}, "prepare_s": time.perf_counter() - started}
        for stage, model in stages.items():
            with tempfile.TemporaryDirectory(prefix="segcompress-onnx-bench-") as work:
                report = benchmark_network(model, settings, work, evaluation=evaluation)
            results["models"][name]["stages"][stage] = report
            print(f"{name} / {stage}: " + ", ".join(f"{r} {e.get('median_ms', e.get('status'))}"
                                                    for r, e in report["runtimes"].items()), flush=True)
        rows += table_rows(name, results["models"][name]["stages"], settings.runtimes)
    write_results(args.name, markdown(rows, args, results), results)


def table_rows(model: str, stages: dict, runtimes) -> list[list[str]]:
    rows = []
    for stage, report in stages.items():
        for runtime in runtimes:
            entry = report["runtimes"].get(runtime, {})
            label = get_runtime(runtime).label
            if entry.get("status") != "ok":
                reason = entry.get("reason") or (entry.get("error") or {}).get("message", "")
                rows.append([model, stage, label, entry.get("status", "-"), "", "", "", "", reason[:110]])
                continue
            base = stages[stage.replace("int8", "fp32")]["runtimes"].get(runtime, {}) if "int8" in stage else {}
            speedup = (f"{base['median_ms'] / entry['median_ms']:.2f}x" if base.get("status") == "ok" else "")
            accuracy = entry.get("accuracy") or {}
            miou = (f"{accuracy['miou'] * 100:.2f} ({accuracy['gap_points']:+.2f})" if accuracy.get("miou") is not None
                    else "")
            peak = entry.get("model_peak_mb")
            rows.append([model, stage, label, f"{entry['median_ms']:.1f}", speedup, f"{entry['size_mb']:.1f}",
                         f"{peak:.0f}" if peak is not None else "", miou,
                         where_int8_time_goes(entry.get("profile")) if "int8" in stage else ""])
    return rows


def markdown(rows: list[list[str]], args: argparse.Namespace, results: dict) -> str:
    header = ["network", "stage", "runtime", "median ms", "int8 speedup", "size MB", "peak MB", "file mIoU (gap)",
              "where the int8 time goes (operator profile)"]
    lines = [f"Input 1x3x{args.size}x{args.size}, {args.threads} threads, median of {args.runs} runs after "
             f"{args.warmup}; {results['machine']}; torch {results['torch']}. Random weights: the mIoU column is the "
             f"file's on {args.eval} PhotoTextures photographs, its gap to eager in points.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
