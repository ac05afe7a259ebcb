"""Two-process CPU DDP (gloo) fit with SparsityRegularization (ACSL, strengths from each rank's own batches),
a StructuredPruning step and PostPruning; each rank writes what it ended up with.

    python tests/scripts/ddp_sparsity.py OUT_DIR

Run by tests/test_sparsity.py. The ranks see different batches, so their ACSL strengths and their post-pruning
scores would differ; they must still apply the same penalties and keep the same groups.
"""

import faulthandler
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _ddp_helpers import checksum, write_rank_result  # noqa: E402

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.callbacks import PostPruning, SparsityRegularization, StructuredPruning  # noqa: E402
from lightning_segcompress.pruning import layer_widths  # noqa: E402

UNET = {"class_path": "segmentation_models_pytorch.Unet",
        "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}}


class Recorder(pl.Callback):
    def __init__(self, sparsity, post):
        self.sparsity, self.post = sparsity, post

    def on_fit_end(self, trainer, pl_module):
        write_rank_result(trainer, {
            "widths": layer_widths(pl_module.net), "network": checksum(pl_module.net),
            "strengths": {n: s.tolist() for n, s in self.sparsity.strengths.items()},
            "post_steps": self.post.steps})


def main() -> None:
    faulthandler.dump_traceback_later(150, exit=True)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = SegmentationModule(UNET, num_classes=4)
    data = SyntheticScenesDataModule(num_classes=4, image_size=(64, 64), num_train=16, num_val=8, batch_size=4)
    sparsity = SparsityRegularization(method="acsl", strength=1e-2, update_every=1)
    post = PostPruning(max_miou_drop=0.0, eval_batches=1)
    pruning = StructuredPruning(amount=0.4, target="macs", importance="bn_scale", start_epoch=1, round_to=4,
                                rel_tolerance=0.2)
    # smp Unet(encoder_depth=3) keeps resnet18 stages its forward never runs
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=2,
                         limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[1],
                         callbacks=[sparsity, pruning, post, Recorder(sparsity, post)])
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
