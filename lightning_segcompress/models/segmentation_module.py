"""The reference LightningModule for recipes and demos. No callback requires it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lightning_segcompress.models.factory import build_network
from lightning_segcompress.state import (
    load_network_weights,
    restore_from_checkpoint,
    write_to_checkpoint,
)
from lightning_segcompress.utils.batch import split_batch
from lightning_segcompress.utils.checkpoint_io import CheckpointError
from lightning_segcompress.utils.inspection import extract_logits

DEFAULT_NETWORK: dict[str, Any] = {
    "class_path": "segmentation_models_pytorch.DeepLabV3Plus",
    "init_args": {"encoder_name": "tu-mobilenetv3_small_100"},
}
OptimizerName = Literal["adamw", "sgd"]
OPTIMIZERS = get_args(OptimizerName)


class SegmentationModule(pl.LightningModule):
    """Semantic segmentation with cross-entropy, mIoU and pixel accuracy, wrapping any network.

    Args:
        network: the network as plain data, ``{"class_path": ..., "init_args": {...}}`` naming a class
            or builder function (smp ``Unet``/``FPN``/``DeepLabV3Plus``/``PSPNet``, torchvision
            ``deeplabv3_*``/``lraspp_*``/``fcn_*``, or any ``nn.Module``), or an already built
            ``nn.Module`` (then pass it again to ``load_from_checkpoint``). ``num_classes`` is filled into
            the builder's ``classes``/``num_classes`` argument when the spec does not set it.
        num_classes: number of classes predicted; must match the data.
        ignore_index: label excluded from the loss and the metrics.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum, nesterov).
        lr: peak learning rate; decays with the poly schedule ``(1 - step / total) ** poly_power`` over
            ``trainer.estimated_stepping_batches``.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        momentum: SGD momentum.
        poly_power: exponent of the poly schedule; ``0`` keeps the learning rate constant.
        aux_loss_weight: weight of the cross-entropy on an ``"aux"`` output (torchvision ``aux_loss=True``).
        weights: start the network from this file (a Lightning checkpoint, compressed ones too, or a bare state
            dict): how a recipe compresses an already trained model. Not stored in the hyperparameters (the
            module's own checkpoints carry the weights).

    Example::

        module = SegmentationModule(
            network={"class_path": "segmentation_models_pytorch.Unet",
                     "init_args": {"encoder_name": "resnet18"}},
            num_classes=6,
        )
    """

    def __init__(
        self,
        network: dict[str, Any] | nn.Module | None = None,
        num_classes: int = 6,
        ignore_index: int = 255,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        poly_power: float = 0.9,
        aux_loss_weight: float = 0.4,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if poly_power < 0:
            raise ValueError(f"poly_power must be >= 0, got {poly_power}.")
        if weights is not None and not Path(weights).is_file():
            raise CheckpointError(f"The weights file {weights} does not exist (or is not a file); give a checkpoint "
                                  "or state dict of this network.")
        self.save_hyperparameters(ignore=["network", "weights"])
        if isinstance(network, nn.Module):
            self.net = network
        else:
            spec = dict(network if network is not None else DEFAULT_NETWORK)
            self.net = build_network(spec, num_classes=num_classes)
            # Stored as plain data: load_from_checkpoint rebuilds the network from it.
            self.hparams["network"] = spec
        if weights is not None:
            self.net = load_network_weights(self.net, weights)
        self.criterion = nn.CrossEntropyLoss(ignore_index=ignore_index)
        metric_args = {"num_classes": num_classes, "ignore_index": ignore_index}
        self.val_miou = MulticlassJaccardIndex(average="macro", **metric_args)
        self.val_pixel_acc = MulticlassAccuracy(average="micro", **metric_args)
        self.test_miou = MulticlassJaccardIndex(average="macro", **metric_args)
        self.test_pixel_acc = MulticlassAccuracy(average="micro", **metric_args)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return extract_logits(self.net(images))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_to_checkpoint(checkpoint, self, "net")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a compressed checkpoint rebuilds the pruned/shunted architecture before its weights are loaded
        restore_from_checkpoint(self, checkpoint)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"The data has {data_classes} classes but the model predicts {self.hparams.num_classes}; "
                "set model num_classes to the data's."
            )

    def _logits_and_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, masks = split_batch(batch)
        output = self.net(images)
        logits = _resize_to(extract_logits(output), masks)
        loss = self.criterion(logits, masks)
        if self.training and isinstance(output, Mapping) and "aux" in output and self.hparams.aux_loss_weight:
            loss = loss + self.hparams.aux_loss_weight * self.criterion(_resize_to(output["aux"], masks), masks)
        return logits, masks, loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        _, _, loss = self._logits_and_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_miou, self.val_pixel_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_miou, self.test_pixel_acc)

    def _evaluate(self, batch: Any, stage: str, miou: MulticlassJaccardIndex, acc: MulticlassAccuracy) -> None:
        logits, masks, loss = self._logits_and_loss(batch)
        preds = logits.argmax(dim=1)
        miou.update(preds, masks)
        acc.update(preds, masks)
        self.log(f"{stage}_loss", loss, on_epoch=True, sync_dist=True)
        self.log(f"{stage}_miou", miou, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_pixel_acc", acc, on_epoch=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class maps (``B x H x W``, int64) at the input resolution."""
        images = split_batch(batch)[0] if not isinstance(batch, torch.Tensor) else batch
        logits = self(images)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=hp.momentum > 0)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if hp.poly_power == 0 or not total or total == float("inf"):
            return opt
        total = int(total)
        power = hp.poly_power
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / total) ** power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _resize_to(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if logits.shape[-2:] == masks.shape[-2:]:
        return logits
    return F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
