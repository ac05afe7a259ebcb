"""Why int8 gains little on ExecuTorch here: single layers, fp32 vs PT2E int8, lowered to XNNPACK (issue 21).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_kernels.py --threads 2

The minimal reproduction behind the operator profile of ``benchmarks/quantization_speedup.py``: each layer of the
kinds that dominate DeepLabV3+(MobileNetV3-large) and Unet-R18 at 512x512 (a 1x1 convolution, which XNNPACK runs
as a GEMM; a dense 3x3 convolution; depthwise 3x3 with and without dilation), alone in a ``.pte``, fp32 and int8
(``prepare_network(backend="pt2e", qat=False)`` + ``calibrate`` + ``convert_network``), timed alternately in one
process so that both see the same machine load. Prints a Markdown table and writes
benchmarks/results/<--name>.{md,json}; the header names the CPU and its int8 dot-product extensions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _results import write_results  # noqa: E402
from torch import nn  # noqa: E402

from lightning_segcompress.benchmark.executorch_runtime import ExecuTorchProgram, export_executorch  # noqa: E402
from lightning_segcompress.benchmark.timing import cpu_description  # noqa: E402
from lightning_segcompress.quantization import (  # noqa: E402
    QuantizationConfig,
    calibrate,
    convert_network,
    prepare_network,
)

LAYERS = {  # name -> (layer, input [C, H, W]); sizes as in the two networks at 512x512 input
    "1x1 conv 256->256 @ 64x64 (GEMM)": (lambda: nn.Conv2d(256, 256, 1), (256, 64, 64)),
    "1x1 conv 960->256 @ 32x32 (GEMM)": (lambda: nn.Conv2d(960, 256, 1), (960, 32, 32)),
    "3x3 conv 64->64 @ 128x128": (lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 128, 128)),
    "3x3 conv 256->256 @ 32x32": (lambda: nn.Conv2d(256, 256, 3, padding=1), (256, 32, 32)),
    "depthwise 3x3 240 @ 64x64": (lambda: nn.Conv2d(240, 240, 3, padding=1, groups=240), (240, 64, 64)),
    "depthwise 3x3 dil 2, 960 @ 32x32": (lambda: nn.Conv2d(960, 960, 3, padding=2, dilation=2, groups=960),
                                         (960, 32, 32)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--name", default="int8_kernels")
    return parser.parse_args()


def int8_program(layer: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    config = QuantizationConfig(backend="pt2e", qat=False, example_shape=(2, *shape))
    prepared = prepare_network(layer, config)
    calibrate(prepared, [torch.randn(2, *shape) for _ in range(2)])
    export_executorch(convert_network(prepared), torch.randn(1, *shape), path)


def alternate(programs: dict[str, ExecuTorchProgram], x: torch.Tensor, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in programs}
    for program in programs.values():
        program(x)
    for _ in range(runs):
        for name, program in programs.items():
            start = time.perf_counter()
            program(x)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, shape) in LAYERS.items():
            layer = nn.Sequential(make(), nn.ReLU()).eval()
            x = torch.randn(1, *shape)
            export_executorch(layer, x, Path(tmp) / "fp32.pte")
            int8_program(layer, shape, Path(tmp) / "int8.pte")
            programs = {kind: ExecuTorchProgram(Path(tmp) / f"{kind}.pte", num_threads=args.threads)
                        for kind in ("fp32", "int8")}
            ms = alternate(programs, x, args.runs)
            rows.append({"layer": name, "fp32_ms": ms["fp32"], "int8_ms": ms["int8"],
                         "speedup": ms["fp32"] / ms["int8"]})
            print(rows[-1], flush=True)
    header = (f"One layer + ReLU per .pte (ExecuTorch/XNNPACK), fp32 vs PT2E int8 (per-channel weights, calibrated), "
              f"input batch 1, median of {args.runs} alternating runs, {args.threads} threads; includes the fp32 "
              f"input/output conversions an int8 layer needs. CPU: {cpu_description()}; torch {torch.__version__}; "
              f"{time.time() - started:.0f} s.")
    lines = [header, "", "| layer | fp32 ms | int8 ms | int8 speedup |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | {r['speedup']:.2f}x |" for r in rows]
    write_results(args.name, "\n".join(lines), {"args": vars(args), "cpu": cpu_description(), "rows": rows})


if __name__ == "__main__":
    main()
