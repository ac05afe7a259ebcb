"""``segcompress shunt``: the block map and knowledge quotients of a model's MobileNetV3 backbone, and the range
a shunt would replace for a target, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_segcompress.models.loading import load_network, load_validation_batches

SYNTHETIC = "lightning_segcompress.SyntheticScenesDataModule"


def shunt_report(
    ckpt: str | None = None,
    network: dict[str, Any] | None = None,
    recipe: str | None = None,
    model_class: str | None = None,
    network_attribute: str | None = None,
    num_classes: int | None = 6,
    data: dict[str, Any] | None = None,
    batches: int = 8,
    input_size: list[int] = (64, 64),
    target: dict[str, float] | None = None,
    variant: str = "arch1",
    output: str | None = None,
) -> str:
    """Print the block map with each residual block's knowledge quotient on validation data.

    Args:
        ckpt: Lightning checkpoint (compressed ones too).
        network: or a network spec ``{"class_path": ..., "init_args": {...}}`` (random weights).
        recipe: or a ``segcompress`` YAML config: its ``model`` (random weights; with ``ckpt``: how to build the
            checkpoint's module).
        model_class: LightningModule class of the checkpoint, built from its stored hyperparameters (default: the class
            LightningCLI recorded in it, else ``lightning_segcompress.SegmentationModule``).
        network_attribute: attribute path of the network in that module (default: found automatically).
        num_classes: classes for network specs that take ``classes``/``num_classes``.
        data: a LightningDataModule spec for the validation batches (default: SyntheticScenesDataModule with
            ``num_classes``).
        batches: validation batches to evaluate.
        input_size: ``[H, W]`` of the example used for shapes and MACs.
        target: also show the range ``blocks: auto`` would choose, e.g. ``{"params": 0.25}``.
        variant: shunt variant for the choice.
        output: also write the report to this Markdown file.
    """
    import torch

    from lightning_segcompress.shunt import (
        block_map,
        format_block_map,
        knowledge_quotients,
        miou_evaluator,
        select_range,
    )
    from lightning_segcompress.utils.inspection import count_macs, count_params, extract_logits

    net = load_network(ckpt, network, recipe, model_class, num_classes, network_attribute).eval()
    spec = data or {"class_path": SYNTHETIC, "init_args": {"num_classes": num_classes}}
    _, pairs = load_validation_batches(spec, batches)
    example = torch.zeros(1, 3, *input_size)
    classes = extract_logits(net(example)).shape[1]
    evaluate = miou_evaluator(pairs, classes)
    blocks = block_map(net, example)
    full = evaluate(net)
    quotients = knowledge_quotients(net, blocks, evaluate, full)
    lines = [f"mIoU on {len(pairs)} validation batches: {full:.4f}", "", format_block_map(blocks, quotients)]
    if target:
        totals = {"params": count_params(net), "macs": count_macs(net, example)}
        plan = select_range(blocks, quotients, target, totals, variant)
        lines += ["", f"blocks: auto with target {target} replaces {plan.describe()}: {plan.params_removed:,} params "
                      f"({plan.params_removed / totals['params']:.1%}) and {plan.macs_removed:,} MACs "
                      f"({plan.macs_removed / totals['macs']:.1%}) removed."]
    report = "\n".join(lines)
    print(report)
    if output:
        Path(output).write_text(report + "\n")
    return report


def main(args: list[str] | None = None) -> None:
    """``segcompress-shunt``: an alias of ``segcompress shunt``."""
    from lightning_segcompress.cli import tool_main

    tool_main("shunt", args)


if __name__ == "__main__":
    main()
