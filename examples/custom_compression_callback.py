"""Write your own compression callback against the protocol: a plan filter that keeps some layers out of every
pruning step, and an observer that logs what each step removed. Runs on CPU in about 20 seconds:

    python examples/custom_compression_callback.py
"""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_segcompress import SyntheticScenesDataModule
from lightning_segcompress.callbacks import KnowledgeDistillation, StructuredPruning
from lightning_segcompress.callbacks.protocol import CompressionCallback
from lightning_segcompress.pruning import layer_widths


class ProtectLayers(CompressionCallback):
    """Never cut the output channels of ``layers`` (a plan filter), and log the channels each step removes."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = list(layers)
        self.removed: list[int] = []  # channels removed per step

    def filter_plan(self, trainer, pl_module, event):
        if event.kind != "structured_pruning":
            return event.plan
        # event.plan: the groups the step would cut, [root layer, is output channels, [indices]]
        return [group for group in event.plan if group[0] not in self.layers]

    def on_after_compression(self, trainer, pl_module, event):
        if event.kind == "structured_pruning":  # event.plan is now what was applied, on every rank
            self.removed.append(sum(len(indices) for _, _, indices in event.plan))
            pl_module.print(f"pruning step {event.step} at epoch {event.epoch}: {self.removed[-1]} channels removed")

    def progress_state(self):  # saved in checkpoints under the key "ProtectLayers"
        return {"removed": self.removed}

    def load_progress_state(self, state):
        self.removed = list(state.get("removed", []))


class Segmenter(pl.LightningModule):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, classes, 1))

    def training_step(self, batch, batch_idx):
        images, masks = batch
        return F.cross_entropy(self.net(images), masks, ignore_index=255)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main() -> dict:
    pl.seed_everything(0)
    module = Segmenter()
    protect = ProtectLayers(["0"])
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_train_batches=4, limit_val_batches=1,
                         callbacks=[StructuredPruning(amount=0.4, target="channels", schedule="linear", start_epoch=1,
                                                      end_epoch=3, steps=2, round_to=None, rel_tolerance=0.5),
                                    protect, KnowledgeDistillation(snapshot_at="before_compression")])
    data = SyntheticScenesDataModule(num_classes=4, image_size=(32, 32), num_train=32, num_val=8, batch_size=8)
    trainer.fit(module, datamodule=data)
    widths = layer_widths(module.net)
    print(f"channels per layer after pruning: {widths} (layer '0' protected); removed per step: {protect.removed}")
    return {"widths": widths, "removed": protect.removed}


if __name__ == "__main__":
    main()
