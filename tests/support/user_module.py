"""A user-style LightningModule for the composition tests: dict batches, the network under an attribute name no
callback knows (``segmenter_net``), ``training_step`` returning a dict, its own optimizer and LR schedule."""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


class TinySegNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(32, classes, 1), nn.Upsample(scale_factor=2, mode="bilinear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class UserSegmenter(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.segmenter_net = TinySegNet()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter_net(images)

    def training_step(self, batch, batch_idx):
        logits = self.segmenter_net(batch["image"])
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=255)
        self.log("train_loss", loss)
        return {"loss": loss, "pixels": batch["mask"].numel()}

    def validation_step(self, batch, batch_idx):
        logits = self.segmenter_net(batch["image"])
        self.log("val_loss", F.cross_entropy(logits, batch["mask"], ignore_index=255))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}


class ColourScenes(Dataset):
    """Images whose label is the strongest colour channel (a learnable 3-class task), as dicts."""

    def __init__(self, count: int, size: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(count, 3, size, size, generator=generator)
        self.masks = self.images.argmax(1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "mask": self.masks[index]}


def loaders(batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(ColourScenes(8, seed=0), batch_size=batch_size),
            DataLoader(ColourScenes(4, seed=1), batch_size=batch_size))


class ColourScenesData(pl.LightningDataModule):
    """The same scenes as a LightningDataModule, for LightningCLI runs
    (``--data=support.user_module.ColourScenesData``)."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return loaders(self.batch_size)[0]

    def val_dataloader(self) -> DataLoader:
        return loaders(self.batch_size)[1]
