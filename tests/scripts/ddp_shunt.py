"""Two-process CPU DDP (gloo) fit with ShuntReplacement (blocks: auto, one stage-A epoch, then stage B) and
KnowledgeDistillation (ACE from the snapshot taken before the splice); each rank writes what it ended up with.

    python tests/scripts/ddp_shunt.py OUT_DIR

Run by tests/test_shunt_replacement.py. The ranks measure knowledge quotients on different validation batches
and start from different random shunts; they must still replace the same blocks and end with identical weights.
"""

import faulthandler
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _ddp_helpers import RankSeed, checksum, write_rank_result  # noqa: E402

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.callbacks import KnowledgeDistillation, ShuntReplacement  # noqa: E402

DEEPLAB = {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
           "init_args": {"encoder_name": "tu-mobilenetv3_small_100"}}


class Recorder(pl.Callback):
    def __init__(self, shunt, kd):
        self.shunt, self.kd = shunt, kd

    def on_train_epoch_end(self, trainer, pl_module):
        if self.shunt.phase == "A":
            self.stage_a = checksum(self.shunt.shunt)

    def on_fit_end(self, trainer, pl_module):
        write_rank_result(trainer, {
            "phase": self.shunt.phase, "blocks": self.shunt.plan.names, "network": checksum(pl_module.net),
            "stage_a_shunt": self.stage_a, "teacher": checksum(self.kd.distiller.teacher),
            "kd_logged": "kd/ace_step" in trainer.callback_metrics})


def main() -> None:
    faulthandler.dump_traceback_later(150, exit=True)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = SegmentationModule(DEEPLAB, num_classes=3)
    data = SyntheticScenesDataModule(num_classes=3, image_size=(64, 64), num_train=8, num_val=4, batch_size=2)
    shunt = ShuntReplacement(blocks="auto", target={"params": 0.1}, stage_a_epochs=1, eval_batches=1)
    kd = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression", losses={"ace": {"kappa": 0.3}})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1],
                         callbacks=[RankSeed(), shunt, kd, Recorder(shunt, kd)])
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
