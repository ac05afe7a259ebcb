"""Eager / TorchScript-lite / ExecuTorch latency and size of three reference segmentation networks.

    .venv/bin/python benchmarks/device_latency.py --size 512 --threads 2 --runs 10

Prints a Markdown table and writes it (plus the raw JSON) to benchmarks/results/device_latency.{md,json}.
Each exported model is timed in a fresh subprocess (peak RSS is that process's own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network, markdown_table
from lightning_segcompress.benchmark.report import add_stage
from lightning_segcompress.models import build_network

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "smp DeepLabV3Plus(tu-mobilenetv3_large_100)": {
        "class_path": "segmentation_models_pytorch.DeepLabV3Plus",
        "init_args": {"encoder_name": "tu-mobilenetv3_large_100"},
    },
    "smp Unet(resnet18)": {"class_path": "segmentation_models_pytorch.Unet", "init_args": {"encoder_name": "resnet18"}},
    "torchvision lraspp_mobilenet_v3_large": {
        "class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--runtimes", nargs="+", default=["eager", "torchscript_lite", "executorch"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "device_latency"))
    args = parser.parse_args()

    settings = BenchmarkSettings(
        input_shape=(1, 3, args.size, args.size),
        runtimes=tuple(args.runtimes),
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
    )
    stages = {}
    with tempfile.TemporaryDirectory() as workdir:
        for i, (name, spec) in enumerate(MODELS.items()):
            torch.manual_seed(0)
            network = build_network(spec, num_classes=args.classes).eval()
            add_stage(stages, name, benchmark_network(network, settings, Path(workdir) / str(i)))
            print(f"done: {name}", flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads"
    table = markdown_table(stages, label="model")
    header = (
        f"Input 1x3x{args.size}x{args.size}, {args.classes} classes, {args.warmup} warm-up + {args.runs} "
        f"timed runs; machine: {machine}.\n\n"
    )
    print("\n" + header + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + table + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "settings": vars(args), "models": stages}, indent=2)
    )


if __name__ == "__main__":
    main()
