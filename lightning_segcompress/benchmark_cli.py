"""``segcompress-benchmark``: the DeviceBenchmark measurements for a checkpoint or network, without training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jsonargparse import CLI

from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network, markdown_table, write_report
from lightning_segcompress.benchmark.report import add_stage
from lightning_segcompress.models.factory import build_network, resolve_class_path
from lightning_segcompress.utils.inspection import find_network
from lightning_segcompress.utils.shapes import input_shape


def load_network(
    checkpoint: str | None, network: dict[str, Any] | None, model_class: str, num_classes: int | None,
    network_attribute: str | None = None, recipe: str | None = None,
):
    """The network of a checkpoint, a network spec or (``recipe``) the ``model`` of a ``segcompress`` YAML config."""
    if sum(source is not None for source in (checkpoint, network, recipe)) != 1:
        sources = "a checkpoint (--checkpoint) or a network spec (--network)"
        raise ValueError(f"Give exactly one of {sources}{' or a recipe (--recipe)' if recipe else ''}.")
    if recipe is not None:
        return find_network(module_from_recipe(recipe), network_attribute)
    if network is not None:
        return build_network(network, num_classes=num_classes)
    module = resolve_class_path(model_class).load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    return find_network(module, network_attribute)


def module_from_recipe(path: str):
    """Instantiate the ``model:`` section of a LightningCLI config (random weights) the way ``segcompress`` does."""
    import pytorch_lightning as pl
    import yaml
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(Path(path).read_text()) or {}
    if "model" not in config:
        raise ValueError(f"{path} has no 'model:' section; give a segcompress/LightningCLI config.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    return parser.instantiate_classes(parser.parse_object({"model": config["model"]})).model


def benchmark(
    checkpoint: str | None = None,
    network: dict[str, Any] | None = None,
    baseline_checkpoint: str | None = None,
    baseline_network: dict[str, Any] | None = None,
    model_class: str = "lightning_segcompress.SegmentationModule",
    network_attribute: str | None = None,
    num_classes: int | None = 19,
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
    """Benchmark a model from a checkpoint or a network spec; optionally compare it with a baseline.

    Args:
        checkpoint: Lightning checkpoint of ``model_class`` to measure.
        network: or a network spec ``{"class_path": ..., "init_args": {...}}`` (random weights).
        baseline_checkpoint: checkpoint to compare against (ratios are baseline / model).
        baseline_network: or a network spec to compare against.
        model_class: LightningModule class of the checkpoints.
        network_attribute: attribute path of the network in that module (default: found automatically).
        num_classes: classes for network specs that take ``classes``/``num_classes``.
        input_size: ``[H, W]`` of the benchmark input (``[N, C, H, W]`` is deprecated).
        batch_size: batch size of the benchmark input.
        runtimes: any of ``eager``, ``torchscript_lite``, ``executorch``.
        threads: CPU threads for timing (default: torch's).
        warmup: untimed calls before timing.
        runs: timed calls.
        atol: largest accepted absolute output difference to eager.
        profile: also record the time per operator of every runtime (separate runs after the timed ones).
        output_dir: where the exported models, benchmark.json and benchmark.md go.
    """
    settings = BenchmarkSettings(input_shape=input_shape(input_size, batch_size, owner="segcompress-benchmark"),
                                 runtimes=tuple(runtimes), threads=threads, warmup=warmup, runs=runs, tolerance=atol,
                                 profile=profile)
    out = Path(output_dir)
    stages: dict[str, dict] = {}
    if baseline_checkpoint is not None or baseline_network is not None:
        base = load_network(baseline_checkpoint, baseline_network, model_class, num_classes, network_attribute)
        add_stage(stages, "baseline", benchmark_network(base, settings, out / "baseline"))
    model = load_network(checkpoint, network, model_class, num_classes, network_attribute)
    add_stage(stages, "model", benchmark_network(model, settings, out / "model"))
    write_report(out, stages, settings.as_dict())
    print(markdown_table(stages))
    print(f"\nwritten: {out / 'benchmark.json'}, {out / 'benchmark.md'}")
    return stages


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    CLI(benchmark, args=args)


if __name__ == "__main__":
    main()
