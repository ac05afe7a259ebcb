"""PostPruning: undo the parts of a pruning step that cost too much validation mIoU."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_segcompress.callbacks._plumbing import checked_input_size, run_dir, validation_miou
from lightning_segcompress.pruning.graph import PruningError
from lightning_segcompress.pruning.post_pruning import group_costs, snapshot_network, take_back
from lightning_segcompress.pruning.state import pruning_history
from lightning_segcompress.utils.inspection import example_input, find_network


class PostPruning(Callback):
    """After each pruning step (of :class:`StructuredPruning` in the same fit), measure what every pruned group
    costs on its own and undo those that cost more than ``tolerance`` mIoU points (after Wei Liu 2021's
    post-pruning, itself after reduced-error pruning of decision trees). Training then fine-tunes what was kept.

    Each group of the step (a root layer and the channels cut with it) is applied alone to a copy of the network
    as it was before the step and scored on the same ``eval_batches`` validation batches (the first ones, eval
    mode: deterministic). Rank 0 decides, every DDP rank applies its decision. What was kept and undone is logged
    (``post_pruning/undone_groups``, ``post_pruning/undone_channels``), kept in the callback's state and written to
    ``<log dir>/post_pruning/post_pruning.md``. The network's checkpointed pruning history contains only the kept
    groups, so checkpoints restore the post-pruned architecture.

    Args:
        tolerance: mIoU points (0-100) a single group may cost; >= 0.
        eval_batches: validation batches scored per group (labels needed).
        ignore_index: label ignored by the mIoU.
        input_size: ``[H, W]`` of the example used to replay pruning.
        report_dir: where the report goes (default ``<log dir>/post_pruning``).
        network_attribute: attribute path of the network in the LightningModule (default: found).

    Example::

        trainer = Trainer(max_epochs=8, callbacks=[
            StructuredPruning(amount=0.5, importance="bn_scale", start_epoch=2),
            PostPruning(tolerance=0.5, eval_batches=8)])
    """

    def __init__(self, tolerance: float = 0.5, eval_batches: int = 8, ignore_index: int = 255,
                 input_size: list[int] | None = None, report_dir: str | None = None,
                 network_attribute: str | None = None) -> None:
        if tolerance < 0:
            raise ValueError(f"tolerance is the mIoU points one pruned group may cost and must be >= 0, got "
                             f"{tolerance}.")
        if eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {eval_batches}.")
        self.tolerance = tolerance
        self.eval_batches = eval_batches
        self.ignore_index = ignore_index
        self.input_size = checked_input_size(input_size)
        self.report_dir = report_dir
        self.network_attribute = network_attribute
        self.steps: list[dict] = []  # per pruning step: baseline score and each group's cost and fate
        self._evaluate = None
        self._before = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tolerance=self.tolerance)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = find_network(pl_module, self.network_attribute)
        self._evaluate, _ = validation_miou(trainer, network, self.eval_batches, self.ignore_index)
        if self._evaluate is None:
            raise PruningError("PostPruning scores pruned groups on validation batches with labels, but the fit has "
                               "none; give the trainer validation data (limit_val_batches > 0).")

    def on_before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = snapshot_network(find_network(pl_module, self.network_attribute))

    def on_after_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._before is None or self._evaluate is None:
            return
        restore_point, before, history_before = self._before
        self._before = None
        network = find_network(pl_module, self.network_attribute)
        history = pruning_history(network)
        if history[:len(history_before)] != history_before or len(history) == len(history_before):
            return  # not a pruning step (e.g. quantization or a shunt)
        step = history[len(history_before):]
        example = example_input(network, size=tuple(self.input_size))
        result = group_costs(before, step, self._evaluate, example, self.tolerance) if trainer.is_global_zero \
            else None
        record = trainer.strategy.broadcast(None if result is None else {
            "baseline": result.baseline, "groups": [g.as_dict() for g in result.groups], "kept": result.kept}, src=0)
        if len(record["kept"]) < len(step):
            take_back(network, restore_point, record["kept"], example)
        self.steps.append({"epoch": trainer.current_epoch, "baseline_miou": record["baseline"],
                           "groups": record["groups"]})
        undone = [g for g in record["groups"] if g["undone"]]
        pl_module.log("post_pruning/undone_groups", float(len(undone)))
        pl_module.log("post_pruning/undone_channels", float(sum(g["channels"] for g in undone)))
        rank_zero_info(f"PostPruning: kept {len(record['kept'])} of {len(step)} pruned groups, undid {len(undone)} "
                       f"({sum(g['channels'] for g in undone)} channels) that cost more than {self.tolerance} points.")
        if trainer.is_global_zero:
            self.write_report(trainer)

    def write_report(self, trainer: pl.Trainer) -> None:
        folder = run_dir(trainer, "post_pruning", self.report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["# Post-pruning", "", f"Tolerance: {self.tolerance} mIoU points per group; each group scored alone "
                 "on the same validation batches.", ""]
        for step in self.steps:
            lines += [f"## Step at epoch {step['epoch']} (mIoU before the step {step['baseline_miou']:.4f})", "",
                      "| root layer | channels removed | cost (points) | decision |", "|---|---|---|---|"]
            lines += [f"| {g['layer']} | {g['channels']} | {g['cost_points']:+.2f} | "
                      f"{'undone' if g['undone'] else 'kept'} |" for g in step["groups"]]
            lines.append("")
        (folder / "post_pruning.md").write_text("\n".join(lines))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
