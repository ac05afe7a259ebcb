"""``segcompress benchmark``: the DeviceBenchmark measurements for a checkpoint or network, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_segcompress.models.loading import load_network


def benchmark(
    ckpt: str | None = None,
    network: dict[str, Any] | None = None,
    recipe: str | None = None,
    baseline_ckpt: str | None = None,
    baseline_network: dict[str, Any] | None = None,
    model_class: str | None = None,
    network_attribute: str | None = None,
    num_classes: int | None = 6,
    input_size: list[int] = (512, 512),
    batch_size: int = 1,
    runtimes: list[str] = ("eager", "torchscript_lite", "executorch"),
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 10,
    atol: float = 1e-3,
    profile: bool = True,
    output_dir: str = "runs/benchmark",
) -> dict:
    """Benchmark a model from a checkpoint, a network spec or a recipe; optionally compare it with a baseline.

    Args:
        ckpt: Lightning checkpoint to measure (compressed ones too).
        network: or a network spec ``{"class_path": ..., "init_args": {...}}`` (random weights).
        recipe: or a ``segcompress`` YAML config: its ``model`` (random weights; with ``ckpt``: how to build the
            checkpoint's module).
        baseline_ckpt: checkpoint to compare against (ratios are baseline / model).
        baseline_network: or a network spec to compare against.
        model_class: LightningModule class of the checkpoint, built from its stored hyperparameters (default: the class
            LightningCLI recorded in it, else ``lightning_segcompress.SegmentationModule``).
        network_attribute: attribute path of the network in that module (default: found automatically).
        num_classes: classes for network specs that take ``classes``/``num_classes``.
        input_size: ``[H, W]`` of the benchmark input (``[N, C, H, W]`` is deprecated).
        batch_size: batch size of the benchmark input.
        runtimes: any of ``eager``, ``torchscript_lite``, ``executorch``, ``onnxruntime`` (alias ``onnx``; needs the
            ``[onnx]`` extra).
        threads: CPU threads for timing (default: torch's).
        warmup: untimed calls before timing.
        runs: timed calls.
        atol: largest accepted absolute output difference to eager.
        profile: also record the time per operator of every runtime (separate runs after the timed ones).
        output_dir: where the exported models, benchmark.json and benchmark.md go.
    """
    from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network, markdown_table, write_report
    from lightning_segcompress.benchmark.report import add_stage
    from lightning_segcompress.utils.shapes import input_shape

    settings = BenchmarkSettings(input_shape=input_shape(input_size, batch_size, owner="segcompress benchmark"),
                                 runtimes=tuple(runtimes), threads=threads, warmup=warmup, runs=runs, tolerance=atol,
                                 profile=profile)
    out = Path(output_dir)
    stages: dict[str, dict] = {}
    if baseline_ckpt is not None or baseline_network is not None:
        base = load_network(baseline_ckpt, baseline_network, recipe if baseline_ckpt else None, model_class,
                            num_classes, network_attribute)
        add_stage(stages, "baseline", benchmark_network(base, settings, out / "baseline"))
    model = load_network(ckpt, network, recipe, model_class, num_classes, network_attribute)
    add_stage(stages, "model", benchmark_network(model, settings, out / "model"))
    write_report(out, stages, settings.as_dict())
    print(markdown_table(stages))
    print(f"\nwritten: {out / 'benchmark.json'}, {out / 'benchmark.md'}")
    return stages


def main(args: list[str] | None = None) -> None:
    """``segcompress-benchmark``: an alias of ``segcompress benchmark``."""
    from lightning_segcompress.cli import tool_main

    tool_main("benchmark", args)


if __name__ == "__main__":
    main()
