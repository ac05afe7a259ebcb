"""Two-process CPU DDP (gloo) fit with KnowledgeDistillation (a wider teacher from a checkpoint, pixel KL and a
feature hint through a connector) and a StructuredPruning step; each rank writes what it ended up with.

    python tests/scripts/ddp_distillation.py OUT_DIR

Run by tests/test_knowledge_distillation.py. Connectors live outside the DDP-wrapped module, so they only stay
equal across ranks if their initial weights are broadcast and their gradients averaged.
"""

import faulthandler
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _ddp_helpers import RankSeed, checksum, write_rank_result  # noqa: E402

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.callbacks import KnowledgeDistillation, StructuredPruning  # noqa: E402
from lightning_segcompress.models import build_network  # noqa: E402
from lightning_segcompress.pruning import layer_widths  # noqa: E402

UNET = {"class_path": "segmentation_models_pytorch.Unet",
        "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
UNET_WIDE = {"class_path": "segmentation_models_pytorch.Unet",
             "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [64, 32, 16]}}


class Recorder(pl.Callback):
    def __init__(self, kd):
        self.kd = kd

    def on_fit_end(self, trainer, pl_module):
        distiller = self.kd.distiller
        write_rank_result(trainer, {
            "student_widths": layer_widths(pl_module.net), "teacher_widths": layer_widths(distiller.teacher),
            "student": checksum(pl_module.net), "teacher": checksum(distiller.teacher),
            "connector": checksum(distiller.connectors),
            "connector_shape": list(distiller.connectors["hint0"].conv.weight.shape),
            "kd_logged": "kd/total_step" in trainer.callback_metrics})


def main() -> None:
    faulthandler.dump_traceback_later(150, exit=True)
    torch.set_num_threads(1)
    teacher_path = os.path.join(sys.argv[1], "teacher.pt")
    if "LOCAL_RANK" not in os.environ:  # rank 0, before Lightning launches rank 1
        torch.manual_seed(7)
        torch.save(build_network(UNET_WIDE, num_classes=4).state_dict(), teacher_path)
    pl.seed_everything(0)
    model = SegmentationModule(UNET, num_classes=4)
    data = SyntheticScenesDataModule(num_classes=4, image_size=(64, 64), num_train=16, num_val=4, batch_size=4)
    kd = KnowledgeDistillation(teacher=UNET_WIDE, teacher_checkpoint=teacher_path, losses={"pixel_kl": 1.0},
                               hints=[{"student": "decoder.blocks.0.conv1.0", "teacher": "decoder.blocks.0.conv1.0"}])
    pruning = StructuredPruning(amount=0.4, target="macs", schedule="one_shot", start_epoch=1, round_to=4)
    # smp Unet(encoder_depth=3) keeps resnet18 stages its forward never runs
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
                         max_epochs=2, limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1],
                         callbacks=[RankSeed(), pruning, kd, Recorder(kd)])
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
