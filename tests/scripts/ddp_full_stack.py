"""Two-process CPU DDP (gloo) fit with the full stack of compression callbacks on the user-style module:
SparsityRegularization, StructuredPruning (2 steps) filtered by PostPruning, KnowledgeDistillation with a hint,
QuantizationAwareTraining (fx) and DeviceBenchmark; each rank writes what it ended up with.

    python tests/scripts/ddp_full_stack.py OUT_DIR

Run by tests/test_composition.py: both ranks must take the same decisions and end with the same weights.
"""

import faulthandler
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _ddp_helpers import RankSeed, checksum, write_rank_result  # noqa: E402
from _user_module import UserSegmenter, loaders  # noqa: E402

from lightning_segcompress.benchmark.compression_report import conv_widths  # noqa: E402
from lightning_segcompress.callbacks import (  # noqa: E402
    DeviceBenchmark,
    KnowledgeDistillation,
    PostPruning,
    QuantizationAwareTraining,
    SparsityRegularization,
    StructuredPruning,
)
from lightning_segcompress.compression_state import get_stages  # noqa: E402

SIZE = [32, 32]


class Recorder(pl.Callback):
    def __init__(self, post, distillation, benchmark):
        self.post, self.distillation, self.benchmark = post, distillation, benchmark

    def on_fit_end(self, trainer, pl_module):
        network = pl_module.segmenter_net.eval()
        x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out = network(x)
        write_rank_result(trainer, {
            "widths": conv_widths(network), "stages": get_stages(network), "output": float(out.double().sum()),
            "teacher": checksum(self.distillation.distiller.teacher),
            "connectors": checksum(self.distillation.distiller.connectors),
            "post_steps": self.post.steps, "benchmark_stages": sorted(self.benchmark.stages)})


def main() -> None:
    faulthandler.dump_traceback_later(200, exit=True)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    post = PostPruning(max_miou_drop=2.0, eval_batches=1, input_size=SIZE)
    distillation = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression", input_size=SIZE,
                                         losses={"pixel_kl": 1.0}, hints=[{"student": "body.3", "teacher": "body.3"}])
    benchmark = DeviceBenchmark(input_size=SIZE, runtimes=["eager"], warmup=0, runs=1, isolate=False, memory=False,
                                report=False, eval_batches=1)
    callbacks = [
        RankSeed(),  # ranks would start KD's connectors differently: only the broadcast keeps them equal
        SparsityRegularization(method="slimming", strength=1e-3, end_epoch=2, input_size=SIZE),
        StructuredPruning(amount=0.3, target="macs", schedule="linear", start_epoch=1, end_epoch=3, steps=2,
                          round_to=None, rel_tolerance=0.3, input_size=SIZE),
        post, distillation,
        QuantizationAwareTraining(backend="fx", start_epoch=3, input_size=SIZE),
        benchmark, Recorder(post, distillation, benchmark)]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=4, limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=sys.argv[1], callbacks=callbacks)
    trainer.fit(UserSegmenter(), *loaders(batch_size=2))


if __name__ == "__main__":
    main()
