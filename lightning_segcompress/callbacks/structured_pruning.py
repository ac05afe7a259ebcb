"""StructuredPruning: remove channels for real (torch-pruning DepGraph) on a schedule, during fit."""

from __future__ import annotations

import json
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_segcompress.callbacks._batchnorm import checked_bn_batches, reestimate_statistics
from lightning_segcompress.callbacks._training import load_lr_schedule_state, lr_schedule_state
from lightning_segcompress.callbacks._validation import validation_miou
from lightning_segcompress.callbacks.protocol import CompressionEvent, CompressionProducer, run_plan_filters
from lightning_segcompress.pruning import PruningError, PruningSchedule, prune_with_history
from lightning_segcompress.pruning.budget import MiouBudget, restore_point
from lightning_segcompress.pruning.latency_model import LatencyModel
from lightning_segcompress.pruning.pruner import Pruner, describe_step
from lightning_segcompress.pruning.search import check_supported
from lightning_segcompress.utils import rollback
from lightning_segcompress.utils.inspection import example_input, select_modules
from lightning_segcompress.utils.shapes import checked_input_size

_PRUNER_ATTRIBUTES = ("importance_args", "global_pruning", "round_to", "max_layer_fraction", "seed", "threads",
                      "latency_ranking", "reference", "reference_widths", "latency_model")


class StructuredPruning(CompressionProducer):
    """Prune whole channels of the network on a schedule, with torch-pruning's dependency graph, so the
    model really gets smaller and faster (no masks).

    Each step ranks channel groups by ``importance``, searches torch-pruning's channel ratio until the
    requested fraction of ``target`` (MACs, params, channels or latency of the unpruned model) is removed, hands
    the plan to the plan filters of the other compression callbacks (e.g. :class:`PostPruning`), applies what they
    keep once, and rebuilds the optimizers and LR schedulers (keeping their position). The classifier layers are
    found and protected automatically. The step is decided on rank 0 and broadcast, so DDP ranks stay identical.

    Checkpoints carry the pruning history as plain data: ``trainer.fit/validate/test/predict(ckpt_path=...)``
    restore the pruned architecture while this callback is attached, ``SegmentationModule.load_from_checkpoint``
    always does, and :func:`lightning_segcompress.load_compressed` does for any module in a fresh process.

    Args:
        amount: fraction of ``target`` to remove by the end of the schedule, in (0, 1).
        target: ``"macs"``, ``"params"``, ``"channels"`` or ``"latency"``; the achieved fraction lands within
            ``rel_tolerance`` of ``amount`` (before plan filters, which may keep groups back). ``"latency"`` removes
            ``amount`` of the network's milliseconds on ``runtime`` at ``input_size``: before the first step every
            prunable convolution is exported alone to the runtime and timed at a few widths (the latency model of
            :mod:`lightning_segcompress.pruning.latency_model`; a few minutes on ExecuTorch, kept in checkpoints),
            the search bisects on the model's predicted ms, and each step records the predicted and, measured
            once on the runtime, the real ms of the pruned network (``predicted_ms``, ``measured_ms`` in
            ``pruning_steps.json``).
        runtime: where ``target: latency`` is measured: ``"executorch"`` (XNNPACK, the default; needs
            ``pip install 'lightning-segcompress[executorch]'``), ``"onnxruntime"`` (alias ``"onnx"``; needs
            ``[onnx]``), ``"torchscript_lite"`` or ``"eager"``.
        threads: CPU threads for latency timing (``target: latency``); ``None`` keeps torch's default (and
            ExecuTorch's: all cores). As in ``DeviceBenchmark``: use the deployment's thread count.
        latency_ranking: with ``target: latency``, also rank channels by what they cost on ``runtime``
            (experimental): each group's importance is scaled by how many ms per MAC its channels buy relative to
            the average (:func:`~lightning_segcompress.pruning.latency.model_group_costs`, clipped to 0.5..2),
            and every group keeps its best quarter of channels. ``False`` (default): the same ranking as for MACs.
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"taylor"`` (gradients accumulated over
            ``taylor_batches`` training batches), ``"random"``, or the class path of a torch-pruning
            ``Importance`` (with ``importance_args``).
        schedule: ``"one_shot"`` at ``start_epoch``; ``"linear"`` or ``"agp"`` (cubic) in ``steps`` steps in
            epochs ``start_epoch`` .. ``end_epoch - 1``, training in between.
        start_epoch, end_epoch, steps: when to prune: epochs are 0-based, ``end_epoch`` is the first epoch
            without a step (as everywhere in this package); steps happen at the start of an epoch.
        global_pruning: rank channels across all layers (True) or prune each layer by the same ratio (False).
        round_to: keep every pruned layer's channel count a multiple of this (8 suits vectorised kernels).
        ignored_layers: module names or regexes (full match) whose output channels are never pruned.
        max_layer_fraction: never remove more than this fraction of any one layer's channels, counted from its
            width before the first step (so a multi-step schedule cannot compound it).
        rel_tolerance: accepted relative error of the final step's achieved fraction (0.03 = 3%).
        taylor_batches: training batches whose gradients feed ``taylor`` importance.
        input_size: ``[H, W]`` of the example input used to trace the network, count MACs and (``target:
            latency``) measure latency; default: the training batch's size.
        on_failure: ``"raise"`` (stop training) or ``"skip"`` (warn and keep training unpruned) when a step
            cannot be planned or applied. Either way the network is left exactly as before the step.
        network_attribute: attribute path of the network in the LightningModule (default: found automatically).
        output_dir: where ``pruning_steps.json`` goes; default ``<log_dir>/pruning``.
        seed: seed for ``random`` importance (the same on every rank).
        max_miou_drop: an accuracy budget in mIoU points (0-100), or ``None`` for none. Each step is judged
            after it has been fine-tuned: just before the next step, and the last one at the start of the fit's
            last epoch. The first step whose network scores more than ``max_miou_drop`` points below the unpruned
            network (measured right before step 1, on the same ``eval_batches`` validation batches) is undone --
            network, weights and pruning history back to just before it. With ``budget_backoff`` the remaining
            steps then bisect between the amount kept and the amount that failed (each aims halfway, is judged
            and kept or undone in turn); without it the schedule stops there. Either way the fit keeps the
            largest amount measured within the budget. Needs labelled validation data and one more
            epoch after the last step; keeps one copy of the network's weights. The checks, the achieved
            fraction and the measured drop are logged (``pruning/miou_drop``) and written to
            ``pruning_budget.json`` beside ``pruning_steps.json``.
        budget_backoff: with ``max_miou_drop``, keep pruning after an undone step with steps halfway between what is
            kept and what failed (default), instead of stopping the schedule at the first undone step.
        eval_batches: validation batches the budget is measured on (``None``: all).
        ignore_index: label ignored by the budget's mIoU.
        lr_rewind_epoch: learning-rate rewinding (Renda et al., ICLR 2020): after every step, put the LR
            schedulers and learning rates back where they were at the start of this epoch (<= ``start_epoch``),
            so the pruned network is fine-tuned with a high learning rate again; ``None`` (default) keeps the
            schedule's position. Optimizer state (momentum) is kept either way.
        bn_batches: training batches on which the BatchNorm running statistics are re-estimated after every
            step, after an undone step and before the budget judges a step (no gradients; BN layers the user put
            in eval mode are left alone; at most one epoch's batches); 0 disables. A network pruned with stale
            statistics scores far below what its weights can do, and PostPruning, the budget and fine-tuning
            would all start from that. The time it takes is logged (``batchnorm/reestimation_s``).
        tolerance: deprecated spelling of ``rel_tolerance``.

    Example::

        trainer = Trainer(callbacks=[StructuredPruning(amount=0.5, target="macs", schedule="agp",
                                                       start_epoch=1, end_epoch=7, steps=3)])
        # half the milliseconds of ExecuTorch at 512x512 on 2 threads, in one step
        StructuredPruning(amount=0.5, target="latency", runtime="executorch", threads=2, input_size=[512, 512],
                          round_to=16)

    or in YAML::

        trainer:
          callbacks:
            - class_path: lightning_segcompress.callbacks.StructuredPruning
              init_args: {amount: 0.5, target: macs, importance: l2, schedule: agp,
                          start_epoch: 1, end_epoch: 7, steps: 3, ignored_layers: ["encoder\\\\.model\\\\.conv_stem"]}
    """

    kind = "structured_pruning"
    stage_applier = "lightning_segcompress.pruning.state:apply_stage"

    def __init__(
        self,
        amount: float = 0.5,
        target: str = "macs",
        importance: str = "l2",
        importance_args: dict[str, Any] | None = None,
        schedule: str = "one_shot",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        steps: int = 1,
        global_pruning: bool = True,
        round_to: int | None = 8,
        ignored_layers: list[str] | None = None,
        max_layer_fraction: float = 0.9,
        rel_tolerance: float = 0.03,
        taylor_batches: int = 8,
        input_size: list[int] | None = None,
        on_failure: str = "raise",
        network_attribute: str | None = None,
        output_dir: str | None = None,
        seed: int = 0,
        max_miou_drop: float | None = None,
        budget_backoff: bool = True,
        eval_batches: int | None = 8,
        ignore_index: int = 255,
        lr_rewind_epoch: int | None = None,
        tolerance: float | None = None,
        runtime: str = "executorch",
        threads: int | None = None,
        latency_ranking: bool = False,
        bn_batches: int = 32,
    ) -> None:
        rel_tolerance = self.take_renamed("tolerance", "rel_tolerance", tolerance, rel_tolerance, 0.03)
        self.schedule = PruningSchedule(kind=schedule, amount=amount, start_epoch=start_epoch,
                                        end_epoch=end_epoch, steps=steps)
        # planning, the reference, Taylor gradients and the latency model (Trainer-free)
        self.pruner = Pruner(target, importance, importance_args, global_pruning=global_pruning, round_to=round_to,
                             max_layer_fraction=max_layer_fraction, rel_tolerance=rel_tolerance, seed=seed,
                             runtime=runtime, threads=threads, latency_ranking=latency_ranking, log=rank_zero_info)
        if taylor_batches < 1:
            raise ValueError(f"taylor_batches must be >= 1, got {taylor_batches}.")
        if on_failure not in ("raise", "skip"):
            raise ValueError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}.")
        if max_miou_drop is not None and max_miou_drop < 0:
            raise ValueError(f"max_miou_drop is in mIoU points below the unpruned network and must be >= 0 (or null "
                             f"for no budget), got {max_miou_drop}.")
        if eval_batches is not None and eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 (or null for all), got {eval_batches}.")
        if lr_rewind_epoch is not None and not 0 <= lr_rewind_epoch <= start_epoch:
            raise ValueError(f"lr_rewind_epoch must be an epoch in 0..start_epoch ({start_epoch}): the schedule is "
                             f"rewound to a position it has already passed; got {lr_rewind_epoch}.")
        if isinstance(ignored_layers, str):
            ignored_layers = [ignored_layers]
        self.bn_batches = checked_bn_batches(bn_batches, "StructuredPruning")
        self.target = target
        self.runtime = self.pruner.runtime
        self.importance = importance
        self.ignored_patterns = list(ignored_layers or [])
        self.rel_tolerance = rel_tolerance
        self.taylor_batches = taylor_batches
        self.input_size = checked_input_size(input_size, default=None)
        self.on_failure = on_failure
        self.network_attribute = network_attribute
        self.output_dir = output_dir
        self.max_miou_drop = max_miou_drop
        self.budget_backoff = bool(budget_backoff)
        self.eval_batches = eval_batches
        self.ignore_index = ignore_index
        self.lr_rewind_epoch = lr_rewind_epoch
        # progress, saved in checkpoints
        self.steps_done = 0
        self.budget = MiouBudget(max_miou_drop, backoff=self.budget_backoff) if max_miou_drop is not None else None
        self.lr_rewind_state: dict | None = None
        self.records: list[dict] = []
        # per-fit working state
        self._ignored: list[str] = []
        self._evaluate = None
        self._restore_point = None  # the network just before the last step, while the budget may undo it

    def __getattr__(self, name: str) -> Any:  # the pruner's settings and state, readable on the callback
        if name in _PRUNER_ATTRIBUTES and "pruner" in self.__dict__:
            return getattr(self.pruner, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    latency_timer = property(lambda self: self.pruner.latency_timer,
                             lambda self, timer: setattr(self.pruner, "latency_timer", timer))

    # ---- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = self.network(pl_module)
        self._ignored = sorted(select_modules(network, self.ignored_patterns, "ignored_layers"))
        if stage == "fit":
            check_supported(network, self._ignored)
        super().setup(trainer, pl_module, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._evaluate = self._restore_point = None

    def on_after_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             event: CompressionEvent) -> None:
        if event.kind != self.kind:  # another technique changed the network (e.g. QAT): the restore point is stale
            self._restore_point = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is None:
            return
        last_check = self._final_check_epoch(trainer)
        if last_check is not None and last_check <= self.schedule.last_epoch:
            raise PruningError(f"max_miou_drop judges the last pruning step (epoch {self.schedule.last_epoch}) after "
                               f"fine-tuning, at the start of the fit's last epoch, but max_epochs is "
                               f"{trainer.max_epochs}: raise max_epochs above {self.schedule.last_epoch + 1} or end "
                               "the schedule earlier.")
        self._evaluate, _ = validation_miou(trainer, self.network(pl_module), self.eval_batches, self.ignore_index)
        if self._evaluate is None:
            raise PruningError("max_miou_drop measures mIoU on validation batches with labels, but the fit has none; "
                               "give the trainer validation data (limit_val_batches > 0) or drop max_miou_drop.")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due_steps(trainer.current_epoch - 1):  # a step still waiting for Taylor gradients keeps them
            self.pruner.clear_gradients()
        if self.lr_rewind_epoch == trainer.current_epoch and self.lr_rewind_state is None:
            self.lr_rewind_state = lr_schedule_state(trainer)
        if self.budget is not None and trainer.current_epoch == self._final_check_epoch(trainer) \
                and self.steps_done == self.schedule.steps:
            self._check_budget(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.importance != "taylor" or not self._due_steps(trainer.current_epoch):
            return
        self.pruner.accumulate_gradients(self.network(pl_module))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        due = self._due_steps(trainer.current_epoch)
        if not due:
            return
        if self.importance == "taylor":
            last_batch = batch_idx >= trainer.num_training_batches - 1
            done = self.pruner.gradient_batches
            if done < self.taylor_batches and not (last_batch and done > 0):
                return
        for step in due:
            if self.budget is not None and not self._check_budget(trainer, pl_module):
                self.steps_done = self.schedule.steps  # the budget is spent: no further steps
                return
            self.prune_step(trainer, pl_module, step, batch)

    def progress_state(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, **self.pruner.state(), "records": self.records,
                "input_size": self.input_size,
                "budget": self.budget.summary() if self.budget is not None else None,
                "lr_rewind_state": self.lr_rewind_state}

    def load_progress_state(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.pruner.load_state(state_dict)
        self.records = list(state_dict.get("records", []))
        self.input_size = state_dict.get("input_size") or self.input_size
        if self.budget is not None:
            self.budget = MiouBudget.from_dict(state_dict.get("budget"), self.max_miou_drop, self.budget_backoff)
        self.lr_rewind_state = state_dict.get("lr_rewind_state") or self.lr_rewind_state

    # ---- the pruning step ------------------------------------------------------------------------------

    def _due_steps(self, epoch: int) -> list[int]:
        """1-based steps whose epoch has come and that have not run (several after a resume that skipped)."""
        return [k for k, step_epoch in enumerate(self.schedule.step_epochs(), start=1)
                if k > self.steps_done and step_epoch <= epoch]

    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, batch: Any) -> None:
        network = self.network(pl_module)
        example = self._example(network, batch)
        self.pruner.begin(network, example)
        fraction = self.schedule.fraction_after(step)
        if self.budget is not None:  # after an undone step: halfway between what is kept and what failed
            fraction = self.budget.target_fraction(fraction)
        payload = self._plan(trainer, pl_module, network, example, step, fraction) if trainer.is_global_zero \
            else None
        payload = trainer.strategy.broadcast(payload, src=0)  # every rank applies rank 0's decision
        if payload.get("latency_model") and self.latency_model is None:  # built on rank 0 in this step
            self.pruner.set_latency_model(LatencyModel.from_dict(payload["latency_model"]))
        if "error" not in payload:
            if self.budget is not None:
                self._restore_point = restore_point(network)
            before = rollback.snapshot(network)

            def apply() -> nn.Module:
                prune_with_history(network, payload["history"], example)
                return network

            try:
                event = self.compress(trainer, pl_module, network, apply, lambda: rollback.restore(network, before),
                                      step=step, plan=payload["history"], bn_batches=self.bn_batches)
            except Exception as err:  # noqa: BLE001 - reported below, the network is already restored
                payload = {"error": f"{type(err).__name__}: {err}"}
        self.steps_done = step
        if "error" in payload:
            message = f"StructuredPruning step {step}/{self.schedule.steps} failed; the network is unchanged. " \
                      f"{payload['error']}"
            if self.on_failure == "raise":
                raise PruningError(message)
            rank_zero_warn(message + " Training continues (on_failure='skip').")
            return
        if self.lr_rewind_state is not None:
            load_lr_schedule_state(trainer, self.lr_rewind_state)
        self._report(trainer, network, example, step, payload["plan"], event.batchnorm)

    # ---- the accuracy budget ---------------------------------------------------------------------------

    def _final_check_epoch(self, trainer: pl.Trainer) -> int | None:
        """The epoch at whose start the last step is judged: the fit's last epoch."""
        max_epochs = trainer.max_epochs
        return None if max_epochs is None or max_epochs < 0 else max_epochs - 1

    def _check_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Before the next step (or at the last epoch's start): measure the network. Before step 1 that sets the
        reference; afterwards the last step is judged and, over the budget, undone. False when the schedule must
        stop (an undone step without backoff)."""
        budget = self.budget
        if budget.stopped:
            return False
        judged = {c["step"] for c in budget.checks}
        if self.steps_done > 0 and self.steps_done in judged:
            return True
        network = self.network(pl_module)
        if self.steps_done > 0:  # judged with the statistics of the fine-tuned weights, on every rank alike
            reestimate_statistics(trainer, pl_module, network, self.bn_batches, label="StructuredPruning budget")
        miou = float(self._evaluate(network)) if trainer.is_global_zero and self._evaluate is not None else None
        miou = trainer.strategy.broadcast(miou, src=0)
        if self.steps_done == 0:
            if budget.reference_miou is None:
                budget.reference_miou = miou
            return True
        fraction = self.records[-1]["achieved_fraction"] if self.records else 0.0
        within = budget.judge(self.steps_done, miou, trainer.current_epoch, fraction)
        pl_module.log("pruning/miou_drop", budget.checks[-1]["drop_points"])
        if not within:
            self._undo_last_step(trainer, pl_module)
        self._write_steps(trainer)
        self._restore_point = None
        return within or not budget.stopped  # with backoff the schedule goes on, aiming lower

    def _undo_last_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step, check = self.steps_done, self.budget.checks[-1]
        if self._restore_point is None:
            self.budget.stopped_at_step = step
            rank_zero_warn(f"StructuredPruning: step {step} costs {check['drop_points']:.2f} mIoU points, more than "
                           f"max_miou_drop={self.max_miou_drop}, but it cannot be undone: it ran before the "
                           "checkpoint this fit resumed from, or another technique (e.g. quantization) has changed "
                           "the network since. The schedule stops here.")
            return
        network = self.network(pl_module)
        point, current = self._restore_point, rollback.snapshot(network)

        def apply() -> nn.Module:
            rollback.restore(network, point)
            return network

        self.compress(trainer, pl_module, network, apply, lambda: rollback.restore(network, current), step=step,
                      plan=[], bn_batches=self.bn_batches)
        kept = self.budget.kept_fraction()
        self.records.append({"step": step, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                             "undone": True, "miou_drop_points": check["drop_points"],
                             "achieved_fraction": kept})
        more = (f"; the next step aims at {self.budget.target_fraction(self.schedule.amount):.3f}"
                if self.budget.backoff and step < self.schedule.steps else "")
        rank_zero_info(f"StructuredPruning: step {step} cost {check['drop_points']:.2f} mIoU points after "
                       f"fine-tuning (max_miou_drop {self.max_miou_drop}); undone. The fit keeps "
                       f"{kept:.3f} of {self.target} removed{more}.")

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
              example: torch.Tensor, step: int, fraction: float) -> dict:
        bisecting = self.budget is not None and self.budget.ceiling is not None  # an approximate target
        exact = step == self.schedule.steps and not bisecting
        try:
            history, plan = self.pruner.plan(network, example, fraction, self._ignored, step=step, exact=exact)
        except PruningError as err:
            return {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - broadcast to all ranks, then raised or skipped
            return {"error": f"{type(err).__name__}: {err}"}
        try:
            kept = run_plan_filters(trainer, pl_module, self.event(trainer, network, step, plan=history))
        except Exception as err:  # noqa: BLE001 - a filter failed: broadcast, then raised or skipped
            return {"error": f"a plan filter failed: {type(err).__name__}: {err}"}
        # with target: latency the payload carries the latency model (built on rank 0 before step 1) to the others
        model = self.latency_model.as_dict() if self.latency_model is not None else None
        return {"history": kept, "plan": {**plan, "groups_planned": len(history), "groups_applied": len(kept)},
                "latency_model": model}

    def _example(self, network: nn.Module, batch: Any) -> torch.Tensor:
        if self.input_size is None:
            image = example_input(network, reference=batch, batch_size=1)
            self.input_size = list(image.shape[-2:])
        return example_input(network, size=tuple(self.input_size), batch_size=1)

    def _report(self, trainer, network: nn.Module, example: torch.Tensor, step: int, plan: dict,
                batchnorm=None) -> None:
        record = {"step": step, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  **self.pruner.step_record(network, example, plan, time_it=trainer.is_global_zero),
                  "bn_reestimation": batchnorm.as_dict() if batchnorm is not None else None}
        self.records.append(record)
        if not trainer.is_global_zero:
            return
        scalars = {f"pruning/{k}": float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        self._write_steps(trainer)
        rank_zero_info(f"StructuredPruning step {step}/{self.schedule.steps} (epoch {trainer.current_epoch}): "
                       + describe_step(record, self.target))

    def _write_steps(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        out = self.run_dir(trainer, "pruning")
        out.mkdir(parents=True, exist_ok=True)
        (out / "pruning_steps.json").write_text(json.dumps(self.records, indent=1))
        if self.budget is not None:
            (out / "pruning_budget.json").write_text(json.dumps(self.budget.summary(), indent=1))
