"""``segcompress memory``: the activation memory report (naive, planned arena, lower bound, measured peak) of a
checkpoint or network spec, untiled and tiled, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_segcompress.models.loading import load_network


def memory(
    ckpt: str | None = None,
    network: dict[str, Any] | None = None,
    recipe: str | None = None,
    model_class: str | None = None,
    network_attribute: str | None = None,
    num_classes: int | None = 6,
    input_size: list[int] = (512, 512),
    batch_size: int = 1,
    grids: list[list[int]] = (),
    split_after: str | None = None,
    tail: bool = True,
    max_stride: int | None = 8,
    measure: bool = True,
    top: int = 5,
    output: str | None = None,
    tensors_csv: str | None = None,
) -> str:
    """Print where a network's activation memory goes, and what planning and tiling save.

    Args:
        ckpt: Lightning checkpoint (compressed ones too).
        network: or a network spec ``{"class_path": ..., "init_args": {...}}`` (random weights).
        recipe: or a ``segcompress`` YAML config: its ``model`` (random weights; with ``ckpt``: how to build the
            checkpoint's module).
        model_class: LightningModule class of the checkpoint, built from its stored hyperparameters (default: the class
            LightningCLI recorded in it, else ``lightning_segcompress.SegmentationModule``).
        network_attribute: attribute path of the network in that module (default: found automatically).
        num_classes: classes for network specs that take ``classes``/``num_classes``.
        input_size: ``[H, W]`` of the input (``[N, C, H, W]`` is deprecated).
        batch_size: batch size of the input.
        grids: also report tiled inference for these ``[rows, columns]`` grids, e.g. ``[[2, 2], [4, 4]]``; each is
            checked against untiled inference.
        split_after: end the tiled prefix after this module (default: before the first non-local op).
        tail: also tile the local ops after the last non-local op (decoder, final upsampling).
        max_stride: tile only maps downsampled at most this many times (``null``: no limit).
        measure: also run the network eagerly and record its peak of live tensors.
        top: how many of the largest tensors to list.
        output: also write the report to this Markdown file.
        tensors_csv: also write every activation of the untiled network in execution order (size fp32/int8,
            first and last step, planned offset) to this CSV file.
    """
    import torch

    from lightning_segcompress.benchmark.runner import LogitsOnly
    from lightning_segcompress.memory import TiledInference, format_memory_report, memory_report, write_tensor_table
    from lightning_segcompress.utils.inspection import input_channels
    from lightning_segcompress.utils.shapes import input_shape

    net = LogitsOnly(load_network(ckpt, network, recipe, model_class, num_classes, network_attribute)).eval()
    shape = input_shape(input_size, batch_size, input_channels(net), owner="segcompress memory")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    untiled = memory_report(net, x, top=top, measure=measure)
    sections = [format_memory_report(untiled, "Activation memory, untiled")]
    if tensors_csv:
        write_tensor_table(untiled, tensors_csv)
    if grids:
        with torch.no_grad():
            reference = net(x)
    for grid in grids:
        tiled = TiledInference(net, list(shape), grid, split_after, tail, max_stride)
        with torch.no_grad():
            diff = float((tiled(x) - reference).abs().max())
        title = f"Activation memory, tiled {grid[0]}x{grid[1]}"
        sections.append(format_memory_report(memory_report(tiled, x, top=top, measure=measure), title)
                        + f"\n{tiled.plan.describe()}.\nLargest difference to untiled output: {diff:.2e}.\n")
    report = "\n".join(sections)
    print(report)
    if output:
        Path(output).write_text(report)
    return report


def main(args: list[str] | None = None) -> None:
    """``segcompress-memory``: an alias of ``segcompress memory``."""
    from lightning_segcompress.cli import tool_main

    tool_main("memory", args)


if __name__ == "__main__":
    main()
