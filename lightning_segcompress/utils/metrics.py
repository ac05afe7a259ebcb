"""Scoring a network on a fixed set of labelled batches, as the compression steps that decide by accuracy
(knowledge quotients, post-pruning) need it. Pure torch + torchmetrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_segcompress.utils.inspection import evaluation_mode, extract_logits, module_device

Evaluator = Callable[[nn.Module], float]


def logits_at_masks(network: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) \
        -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, masks)`` per batch of ``(images, masks)``, on the network's device: eval mode, no gradients,
    logits resized (bilinear) to the masks when their sizes differ."""
    device = module_device(network)
    with evaluation_mode(network), torch.no_grad():
        for images, masks in batches:
            images, masks = images.to(device), masks.to(device)
            logits = extract_logits(network(images))
            if logits.shape[-2:] != masks.shape[-2:]:
                logits = nn.functional.interpolate(logits, size=masks.shape[-2:], mode="bilinear",
                                                   align_corners=False)
            yield logits, masks


def miou_evaluator(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   ignore_index: int = 255) -> Evaluator:
    """A function that returns ``network``'s mIoU (torchmetrics, eval mode, no gradients) on ``batches`` of
    ``(images, masks)``; the batches are kept, so every call measures the same pixels."""
    batches = list(batches)
    if not batches:
        raise ValueError("no evaluation batches: scoring a network needs validation batches with labels.")

    def evaluate(network: nn.Module) -> float:
        device = module_device(network)
        # local to this process: callers decide on one rank (or on each) and broadcast, never sync mid-decision
        metric = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index,
                                        sync_on_compute=False).to(device)
        for logits, masks in logits_at_masks(network, batches):
            metric.update(logits.argmax(1), masks)
        return float(metric.compute())

    return evaluate
