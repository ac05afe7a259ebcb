"""The fit's validation data for callbacks that score networks: the same first batches every time."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch

from lightning_segcompress.utils.batch import split_batch
from lightning_segcompress.utils.inspection import evaluation_mode, extract_logits, module_device
from lightning_segcompress.utils.metrics import miou_evaluator


def validation_batches(trainer: pl.Trainer, count: int | None) -> list:
    """Up to ``count`` (all if None) batches of the fit's validation data, on the module's device; [] if the
    fit has none."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    loop.setup_data()
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    batches = []
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        for batch in loader:
            if count is not None and len(batches) >= count:
                return batches
            batches.append(trainer.lightning_module._apply_batch_transfer_handler(batch))
    return batches


def validation_miou(trainer: pl.Trainer, network: torch.nn.Module, count: int | None,
                    ignore_index: int = 255) -> tuple[Callable[[torch.nn.Module], float] | None, int]:
    """A function scoring a network's mIoU on up to ``count`` labelled batches of the fit's validation data (the
    same batches at every call), and how many batches it uses; ``(None, 0)`` without labelled batches."""
    batches = labelled_validation_batches(trainer, count)
    if not batches:
        return None, 0
    with evaluation_mode(network):
        classes = extract_logits(network(batches[0][0][:1].to(module_device(network)))).shape[1]
    return miou_evaluator(batches, classes, ignore_index), len(batches)


def labelled_validation_batches(trainer: pl.Trainer, count: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, masks)`` of up to ``count`` validation batches that have labels."""
    batches = [split_batch(b) for b in validation_batches(trainer, count)]
    return [(images, masks) for images, masks in batches if masks is not None]
