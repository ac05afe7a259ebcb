"""PostPruning: keep back the parts of a pruning step that would cost too much validation mIoU."""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from lightning_segcompress.callbacks._batchnorm import checked_bn_batches, reestimate_statistics
from lightning_segcompress.callbacks._input_size import training_input_size
from lightning_segcompress.callbacks._validation import validation_miou
from lightning_segcompress.callbacks.protocol import (
    CompressionCallback,
    CompressionEvent,
    History,
)
from lightning_segcompress.pruning.graph import PruningError
from lightning_segcompress.pruning.post_pruning import group_costs
from lightning_segcompress.utils.inspection import example_input
from lightning_segcompress.utils.shapes import checked_input_size


class PostPruning(CompressionCallback):
    """Filter every :class:`StructuredPruning` step of the same fit: measure what each planned group costs on its
    own and keep back those that cost more than ``max_group_miou_drop`` mIoU points, before the step is applied (after
    Wei Liu 2021's post-pruning, itself after reduced-error pruning of decision trees). The step then removes only
    the cheap groups, once; training fine-tunes what was kept.

    This is a plan filter of the compression protocol (``filter_plan``): it runs on global rank 0 while the
    step is planned, tries each group on the network itself and rolls it back (no copy of the network), and the
    kept plan is broadcast to every DDP rank. Each group is scored on the same ``eval_batches`` validation batches
    (the first ones, eval mode: deterministic). What was kept and undone is logged (``post_pruning/undone_groups``,
    ``post_pruning/undone_channels``), kept in the callback's state and written to
    ``<log dir>/post_pruning/post_pruning.md``. The checkpointed pruning history holds only the kept groups.

    Args:
        max_group_miou_drop: mIoU points (0-100) a single group may cost; >= 0. (``StructuredPruning``'s
            ``max_miou_drop`` is another thing: a budget for the whole pruned network.)
        eval_batches: validation batches scored per group (labels needed); ``None``: all.
        ignore_index: label ignored by the mIoU.
        input_size: ``[H, W]`` of the example used to try the groups; ``None`` (default): the size of the fit's
            training batches (read at fit start), as ``StructuredPruning`` traces the network.
        output_dir: where the report goes (default ``<log dir>/post_pruning``).
        network_attribute: attribute path of the network in the LightningModule (default: found).
        bn_batches: training batches on which BatchNorm statistics are re-estimated before every score (the
            unpruned network's and each group's trial; put back afterwards), so that a group is judged by what its
            pruned network can do, not by statistics that belong to the unpruned one; 0 disables. Each trial
            costs these batches' forward passes.
        max_miou_drop, tolerance, report_dir: deprecated spellings of ``max_group_miou_drop`` (both) and
            ``output_dir``.

    Example::

        trainer = Trainer(max_epochs=8, callbacks=[
            StructuredPruning(amount=0.5, importance="bn_scale", start_epoch=2),
            PostPruning(max_group_miou_drop=0.5, eval_batches=8)])
    """

    def __init__(self, max_group_miou_drop: float = 0.5, eval_batches: int | None = 8, ignore_index: int = 255,
                 input_size: list[int] | None = None, output_dir: str | None = None,
                 network_attribute: str | None = None, tolerance: float | None = None,
                 report_dir: str | None = None, bn_batches: int = 8, max_miou_drop: float | None = None) -> None:
        given = "max_miou_drop" if max_miou_drop is not None else "tolerance" if tolerance is not None \
            else "max_group_miou_drop"
        max_group_miou_drop = self.take_renamed("max_miou_drop", "max_group_miou_drop", max_miou_drop,
                                                max_group_miou_drop, 0.5)
        max_group_miou_drop = self.take_renamed("tolerance", "max_group_miou_drop", tolerance,
                                                max_group_miou_drop, 0.5)
        output_dir = self.take_renamed("report_dir", "output_dir", report_dir, output_dir, None)
        if max_group_miou_drop < 0:
            raise ValueError(f"{given} is the mIoU points one pruned group may cost and must be >= 0, got "
                             f"{max_group_miou_drop}.")
        if eval_batches is not None and eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 (or None for all), got {eval_batches}.")
        self.bn_batches = checked_bn_batches(bn_batches, "PostPruning")
        self.max_group_miou_drop = max_group_miou_drop
        self.eval_batches = eval_batches
        self.ignore_index = ignore_index
        self.input_size = checked_input_size(input_size)  # None: the training batches' size, read at fit start
        self.output_dir = output_dir
        self.network_attribute = network_attribute
        self.steps: list[dict] = []  # per pruning step: baseline score and each group's cost and fate
        self._evaluate = None

    @property
    def max_miou_drop(self) -> float:
        """Deprecated name of :attr:`max_group_miou_drop` (``StructuredPruning``'s ``max_miou_drop`` is a budget for
        the whole network, this one a cost per group)."""
        warnings.warn("PostPruning.max_miou_drop is deprecated and will be removed in the next release; read "
                      "max_group_miou_drop.", FutureWarning, stacklevel=2)
        return self.max_group_miou_drop

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate, _ = validation_miou(trainer, self.network(pl_module), self.eval_batches, self.ignore_index)
        if self._evaluate is None:
            raise PruningError("PostPruning scores pruned groups on validation batches with labels, but the fit has "
                               "none; give the trainer validation data (limit_val_batches > 0).")
        if self.input_size is None:  # every rank, before any step is planned (a filter runs on rank 0 alone)
            self.input_size = training_input_size(trainer, pl_module, "PostPruning")

    def filter_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent) -> History:
        if event.kind != "structured_pruning" or not event.plan or self._evaluate is None:
            return event.plan
        if self.input_size is None:  # the fit did not start here (e.g. the filter is called directly)
            self.input_size = training_input_size(trainer, pl_module, "PostPruning", synchronize=False)
        example = example_input(event.network, size=tuple(self.input_size))
        def reestimate(network):  # rank 0 alone: no collective
            return reestimate_statistics(trainer, pl_module, network, self.bn_batches, synchronize=False)

        result = group_costs(event.network, event.plan, self._evaluate, example, self.max_group_miou_drop,
                             prepare=reestimate if self.bn_batches else None)
        self.steps.append({"epoch": event.epoch, "step": event.step, "baseline_miou": result.baseline,
                           "bn_batches": self.bn_batches,
                           "groups": [g.as_dict() for g in result.groups]})
        undone = result.undone
        rank_zero_info(f"PostPruning: keeps {len(result.kept)} of {len(event.plan)} planned groups, holds back "
                       f"{len(undone)} ({sum(g.channels for g in undone)} channels) that cost more than "
                       f"{self.max_group_miou_drop} points.")
        self.write_report(trainer)
        return result.kept

    def on_after_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             event: CompressionEvent) -> None:
        if event.kind != "structured_pruning":
            return
        # only rank 0 filtered: every rank logs the same numbers, read from the plan it applied
        record = trainer.strategy.broadcast(self.steps[-1] if self.steps else None, src=0)
        if record is None or record.get("step") != event.step:
            return
        undone = [g for g in record["groups"] if g["undone"]]
        pl_module.log("post_pruning/undone_groups", float(len(undone)))
        pl_module.log("post_pruning/undone_channels", float(sum(g["channels"] for g in undone)))
        if not trainer.is_global_zero:
            self.steps.append(record)

    def write_report(self, trainer: pl.Trainer) -> None:
        folder = self.run_dir(trainer, "post_pruning")
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["# Post-pruning", "", f"max_group_miou_drop: {self.max_group_miou_drop} mIoU points per group; "
                 "each group scored alone on the same validation batches, before the step was applied" + (
                     f", BatchNorm statistics re-estimated on {self.bn_batches} training batches before each score."
                     if self.bn_batches else "."), ""]
        for step in self.steps:
            lines += [f"## Step at epoch {step['epoch']} (mIoU before the step {step['baseline_miou']:.4f})", "",
                      "| root layer | channels removed | cost (points) | decision |", "|---|---|---|---|"]
            lines += [f"| {g['layer']} | {g['channels']} | {g['cost_points']:+.2f} | "
                      f"{'undone' if g['undone'] else 'kept'} |" for g in step["groups"]]
            lines.append("")
        (folder / "post_pruning.md").write_text("\n".join(lines))

    def progress_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.steps = list(state.get("steps", []))
