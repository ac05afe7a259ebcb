"""Two-process CPU DDP (gloo): every compression callback in two fits of the same processes; each rank writes
what it ended up with, per fit.

    PYTHONPATH=tests python tests/scripts/ddp_stack.py OUT_DIR

1. ``stack``: the user-style module (with a layer its forward never uses, so DDP must find unused parameters
   before and after every pruning step) with SparsityRegularization (ACSL: strengths from each rank's own
   batches), StructuredPruning (2 linear steps, an importance that scores channels differently on every rank),
   PostPruning, KnowledgeDistillation (snapshot teacher, pixel KL and a hint through a connector),
   QuantizationAwareTraining (fx) and DeviceBenchmark; BatchNorm statistics are recorded right after each step.
2. ``shunt``: a smp DeepLabV3+ (MobileNetV3-small) with ShuntReplacement (blocks: auto, one stage-A epoch, then
   stage B) and KnowledgeDistillation (ACE from the snapshot taken before the splice).

Run by tests/integration/test_ddp.py. Each rank sees other batches and starts its random parameters differently:
the ranks only agree if every decision is made once and broadcast, statistics are all-reduced and parameters
outside the DDP-wrapped module are broadcast and their gradients averaged.
"""

import faulthandler
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch_pruning as tp  # noqa: E402
from torch import nn  # noqa: E402

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule  # noqa: E402
from lightning_segcompress.benchmark.compression_report import conv_widths  # noqa: E402
from lightning_segcompress.callbacks import (  # noqa: E402
    CompressionCallback,
    DeviceBenchmark,
    KnowledgeDistillation,
    PostPruning,
    QuantizationAwareTraining,
    ShuntReplacement,
    SparsityRegularization,
    StructuredPruning,
)
from lightning_segcompress.pruning import pruning_history  # noqa: E402
from lightning_segcompress.state import get_stages  # noqa: E402
from support.ddp import RankSeed, checksum, write_rank_result  # noqa: E402
from support.user_module import UserSegmenter, loaders  # noqa: E402

SIZE = [32, 32]
DEEPLAB = {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
           "init_args": {"encoder_name": "tu-mobilenetv3_small_100"}}
RESULTS = {}


class RankDependentImportance(tp.importance.Importance):
    """Different random scores on every rank (a stand-in for any importance computed from local data)."""

    def __call__(self, group, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else 0
        generator = torch.Generator().manual_seed(1000 * rank + len(group[0].idxs))
        return torch.rand(len(group[0].idxs), generator=generator)


class SegmenterWithUnusedLayer(UserSegmenter):
    def __init__(self) -> None:
        super().__init__()
        self.segmenter_net.add_module("unused", nn.Conv2d(3, 3, 1))  # never called: DDP must find it unused


class StackRecorder(CompressionCallback):
    def __init__(self, sparsity, post, distillation, benchmark):
        self.sparsity, self.post, self.distillation, self.benchmark = sparsity, post, distillation, benchmark
        self.batchnorm = []

    def on_after_compression(self, trainer, pl_module, event):
        if event.batchnorm is None:
            return
        stats = [float(m.running_mean.double().sum() + m.running_var.double().sum())
                 for m in pl_module.segmenter_net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.batchnorm.append({"kind": event.kind, "batches": event.batchnorm.batches, "stats": stats})

    def on_train_epoch_end(self, trainer, pl_module):
        if self.sparsity.strengths:  # the last strengths ACSL applied (it drops them when sparsity ends)
            self.strengths = {n: s.tolist() for n, s in self.sparsity.strengths.items()}

    def on_fit_start(self, trainer, pl_module):
        self.strengths = {}
        self.params_before = sum(p.numel() for p in pl_module.segmenter_net.parameters())

    def on_fit_end(self, trainer, pl_module):
        network = pl_module.segmenter_net.eval()
        x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out = network(x)
        RESULTS["stack"] = {
            "widths": conv_widths(network), "stages": get_stages(network), "output": float(out.double().sum()),
            "history": pruning_history(network), "network": checksum(network),
            "params": sum(p.numel() for p in network.parameters()), "params_before": self.params_before,
            "strengths": self.strengths,
            "batchnorm": self.batchnorm, "post_steps": self.post.steps,
            "teacher": checksum(self.distillation.distiller.teacher),
            "connectors": checksum(self.distillation.distiller.connectors),
            "connector_shape": list(self.distillation.distiller.connectors["hint0"].conv.weight.shape),
            "kd_logged": "kd/total_step" in trainer.callback_metrics,
            "benchmark_stages": sorted(self.benchmark.stages)}


class ShuntRecorder(pl.Callback):
    def __init__(self, shunt, distillation):
        self.shunt, self.distillation = shunt, distillation

    def on_train_epoch_end(self, trainer, pl_module):
        if self.shunt.phase == "A":
            self.stage_a = checksum(self.shunt.shunt)

    def on_fit_end(self, trainer, pl_module):
        RESULTS["shunt"] = {
            "phase": self.shunt.phase, "blocks": self.shunt.plan.names, "network": checksum(pl_module.net),
            "stage_a_shunt": self.stage_a, "teacher": checksum(self.distillation.distiller.teacher),
            "kd_logged": "kd/ace_step" in trainer.callback_metrics}


def trainer(callbacks, strategy="ddp", max_epochs=2) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=max_epochs, limit_train_batches=2,
                      limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=sys.argv[1], callbacks=callbacks)


def fit_stack() -> pl.Trainer:
    pl.seed_everything(0)
    sparsity = SparsityRegularization(method="acsl", strength=1e-2, update_every=1, end_epoch=2, input_size=SIZE)
    post = PostPruning(max_group_miou_drop=2.0, eval_batches=1, input_size=SIZE)
    distillation = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression", input_size=SIZE,
                                         losses={"pixel_kl": 1.0}, hints=[{"student": "body.3", "teacher": "body.3"}])
    benchmark = DeviceBenchmark(input_size=SIZE, runtimes=["eager"], warmup=0, runs=1, isolate=False, memory=False,
                                report=False, eval_batches=1)
    pruning = StructuredPruning(amount=0.3, target="macs", schedule="linear", start_epoch=1, end_epoch=3, steps=2,
                                importance=f"{__name__}.RankDependentImportance", round_to=None, rel_tolerance=0.3,
                                input_size=SIZE)
    callbacks = [
        RankSeed(),  # ranks would start KD's connectors differently: only the broadcast keeps them equal
        sparsity, pruning, post, distillation, QuantizationAwareTraining(backend="fx", start_epoch=3, input_size=SIZE),
        benchmark, StackRecorder(sparsity, post, distillation, benchmark)]
    fit = trainer(callbacks, strategy="ddp_find_unused_parameters_true", max_epochs=4)
    fit.fit(SegmenterWithUnusedLayer(), *loaders(batch_size=2))
    return fit


def fit_shunt() -> pl.Trainer:
    pl.seed_everything(0)
    model = SegmentationModule(DEEPLAB, num_classes=3)
    data = SyntheticScenesDataModule(num_classes=3, image_size=(64, 64), num_train=8, num_val=4, batch_size=2)
    shunt = ShuntReplacement(blocks="auto", target={"params": 0.1}, stage_a_epochs=1, eval_batches=1)
    distillation = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
                                         losses={"ace": {"kappa": 0.3}})
    fit = trainer([RankSeed(), shunt, distillation, ShuntRecorder(shunt, distillation)])
    fit.fit(model, data)
    return fit


def main() -> None:
    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the test with every thread's stack
    torch.set_num_threads(1)
    fit_stack()
    last = fit_shunt()  # the same processes and process group: Lightning launches the ranks once
    write_rank_result(last, RESULTS)


if __name__ == "__main__":
    main()
