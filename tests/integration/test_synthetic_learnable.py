import pytest
import pytorch_lightning as pl
import torch

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule
from support.common import SMP_UNET, trainer_kwargs


@pytest.mark.slow
def test_small_network_learns_synthetic_scenes_far_beyond_colour_baselines(tmp_path):
    """The colour and majority baselines score < 0.25 mIoU (tests/test_data.py); a trained net must not."""
    pl.seed_everything(0)
    data = SyntheticScenesDataModule(num_classes=6, image_size=(64, 64), num_train=512, num_val=32, batch_size=8)
    module = SegmentationModule(network=SMP_UNET, num_classes=6, lr=3e-3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=-1, max_steps=300, limit_train_batches=None,
                                          limit_val_batches=None, num_sanity_val_steps=0))
    trainer.fit(module, datamodule=data)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    assert metrics["val_miou"] > 0.4, metrics  # measured 0.49 after 300 steps; baselines ~0.10
    assert torch.isfinite(torch.tensor(metrics["val_loss"]))
