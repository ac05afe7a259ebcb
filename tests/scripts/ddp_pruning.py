"""Two-process CPU DDP (gloo) fit with StructuredPruning; each rank writes what it ended up with.

    python tests/scripts/ddp_pruning.py OUT_DIR

Run by tests/test_pruning_ddp.py. The importance below scores channels differently on every rank, so the
ranks only agree if the pruning decision is made once and broadcast. Each rank sees other training images, so the
BatchNorm statistics re-estimated after each step only agree if the ranks' sums are all-reduced; they are recorded
right after the step, before DDP's next forward broadcasts rank 0's buffers.
"""

import faulthandler
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch_pruning as tp  # noqa: E402
from _ddp_helpers import checksum, write_rank_result  # noqa: E402

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.callbacks import CompressionCallback, StructuredPruning  # noqa: E402
from lightning_segcompress.pruning import layer_widths, pruning_history  # noqa: E402


class RankDependentImportance(tp.importance.Importance):
    """Different random scores on every rank (a stand-in for any importance computed from local data)."""

    def __call__(self, group, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else 0
        generator = torch.Generator().manual_seed(1000 * rank + len(group[0].idxs))
        return torch.rand(len(group[0].idxs), generator=generator)


class Recorder(CompressionCallback):
    def __init__(self):
        self.batchnorm = []

    def on_after_compression(self, trainer, pl_module, event):
        stats = [float(m.running_mean.double().sum() + m.running_var.double().sum()) for m in pl_module.net.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.batchnorm.append({"batches": event.batchnorm.batches, "stats": stats})

    def on_fit_start(self, trainer, pl_module):
        self.params_before = sum(p.numel() for p in pl_module.net.parameters())

    def on_fit_end(self, trainer, pl_module):
        net = pl_module.net
        write_rank_result(trainer, {
            "widths": layer_widths(net), "history": pruning_history(net), "param_checksum": checksum(net),
            "params": sum(p.numel() for p in net.parameters()), "params_before": self.params_before,
            "batchnorm": self.batchnorm})


def main() -> None:
    faulthandler.dump_traceback_later(150, exit=True)  # a hang fails the test with every thread's stack
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = SegmentationModule({"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_small_100"}}, num_classes=4)
    data = SyntheticScenesDataModule(num_classes=4, image_size=(64, 64), num_train=16, num_val=4, batch_size=4)
    pruning = StructuredPruning(amount=0.4, target="macs", schedule="linear", start_epoch=1, end_epoch=3, steps=2,
                                importance=f"{__name__}.RankDependentImportance", round_to=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1],
                         callbacks=[pruning, Recorder()])
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
