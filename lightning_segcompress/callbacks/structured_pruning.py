"""StructuredPruning: remove channels for real (torch-pruning DepGraph) on a schedule, during fit."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_segcompress.benchmark.runtimes import canonical_name
from lightning_segcompress.callbacks._batchnorm import checked_bn_batches, reestimate_statistics
from lightning_segcompress.callbacks._checkpoints import install_checkpoint_restore, remove_checkpoint_restore
from lightning_segcompress.callbacks._training import load_lr_schedule_state, lr_schedule_state
from lightning_segcompress.callbacks._validation import validation_miou
from lightning_segcompress.callbacks.protocol import (
    CompressionCallback,
    CompressionEvent,
    filter_plan,
    run_compression_step,
)
from lightning_segcompress.pruning import (
    IMPORTANCE_NAMES,
    PruningConfig,
    PruningError,
    PruningSchedule,
    build_importance,
    layer_widths,
    measure,
    plan_step,
    prune_with_history,
)
from lightning_segcompress.pruning.budget import MiouBudget, restore, restore_point
from lightning_segcompress.pruning.graph import _restore, _snapshot, unused_layers
from lightning_segcompress.pruning.importance import resolve_importance_class
from lightning_segcompress.pruning.latency import KeepBest, model_group_costs, weights_from_costs
from lightning_segcompress.pruning.latency_model import (
    RUNTIMES,
    LatencyModel,
    RuntimeTimer,
    build_latency_model,
    check_runtime,
)
from lightning_segcompress.pruning.search import TARGETS, check_supported
from lightning_segcompress.state import write_to_checkpoint
from lightning_segcompress.utils.inspection import (
    example_input,
    find_classifier_layers,
    select_modules,
)
from lightning_segcompress.utils.shapes import checked_input_size

KIND = "structured_pruning"


class StructuredPruning(CompressionCallback):
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
        rel_tolerance = self.take_renamed("tolerance", "rel_tolerance", tolerance,
                                         rel_tolerance, 0.03)
        self.schedule = PruningSchedule(kind=schedule, amount=amount, start_epoch=start_epoch,
                                        end_epoch=end_epoch, steps=steps)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}.")
        try:
            runtime = canonical_name(runtime)
        except ValueError:
            raise ValueError(f"runtime (where target: latency is measured) must be one of {list(RUNTIMES)}, got "
                             f"{runtime!r}.") from None
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {threads}.")
        if target == "latency":
            check_runtime(runtime)  # ExecuTorch missing: fails now, with the install command
        if importance not in IMPORTANCE_NAMES:
            resolve_importance_class(importance)  # fails now, with the fix, rather than at the first step
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be >= 1 (or null for no rounding), got {round_to}.")
        if not 0.0 < max_layer_fraction < 1.0:
            raise ValueError(f"max_layer_fraction must be in (0, 1), got {max_layer_fraction}.")
        if not 0.0 < rel_tolerance < 1.0:
            raise ValueError(f"rel_tolerance is relative to amount and must be in (0, 1), got {rel_tolerance}.")
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
        self.runtime = runtime
        self.threads = threads
        self.latency_ranking = latency_ranking
        self.importance = importance
        self.importance_args = dict(importance_args or {})
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.ignored_patterns = list(ignored_layers or [])
        self.max_layer_fraction = max_layer_fraction
        self.rel_tolerance = rel_tolerance
        self.taylor_batches = taylor_batches
        self.input_size = checked_input_size(input_size, default=None)
        self.on_failure = on_failure
        self.network_attribute = network_attribute
        self.output_dir = output_dir
        self.seed = seed
        self.max_miou_drop = max_miou_drop
        self.budget_backoff = bool(budget_backoff)
        self.eval_batches = eval_batches
        self.ignore_index = ignore_index
        self.lr_rewind_epoch = lr_rewind_epoch
        # progress, saved in checkpoints
        self.steps_done = 0
        self.budget = MiouBudget(max_miou_drop, backoff=self.budget_backoff) if max_miou_drop is not None else None
        self.lr_rewind_state: dict | None = None
        self.reference: dict[str, int] | None = None
        self.reference_widths: dict[str, int] | None = None
        self.records: list[dict] = []
        self.latency_model: LatencyModel | None = None  # target latency: built before the first step
        # how latency is timed (a LayerTimer; None: a RuntimeTimer on runtime/threads); tests inject a fake one
        self.latency_timer = None
        # per-fit working state
        self._ignored: list[str] = []
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._grad_batches = 0
        self._evaluate = None
        self._restore_point = None  # the network just before the last step, while the budget may undo it

    # ---- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = self.network(pl_module)
        self._ignored = sorted(select_modules(network, self.ignored_patterns, "ignored_layers"))
        if stage == "fit":
            check_supported(network, self._ignored)
        install_checkpoint_restore(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_checkpoint_restore(pl_module)
        self._evaluate = self._restore_point = None

    def on_after_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             event: CompressionEvent) -> None:
        if event.kind != KIND:  # another technique changed the network (e.g. QAT): the restore point is stale
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
        self._grad_sum, self._grad_batches = {}, 0
        if self.lr_rewind_epoch == trainer.current_epoch and self.lr_rewind_state is None:
            self.lr_rewind_state = lr_schedule_state(trainer)
        if self.budget is not None and trainer.current_epoch == self._final_check_epoch(trainer) \
                and self.steps_done == self.schedule.steps:
            self._check_budget(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.importance != "taylor" or not self._due_steps(trainer.current_epoch):
            return
        network = self.network(pl_module)
        for name, p in network.named_parameters():
            if p.grad is not None:
                grad = p.grad.detach()
                self._grad_sum[name] = self._grad_sum[name] + grad if name in self._grad_sum else grad.clone()
        self._grad_batches += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        due = self._due_steps(trainer.current_epoch)
        if not due:
            return
        if self.importance == "taylor":
            last_batch = batch_idx >= trainer.num_training_batches - 1
            if self._grad_batches < self.taylor_batches and not (last_batch and self._grad_batches > 0):
                return
        for step in due:
            if self.budget is not None and not self._check_budget(trainer, pl_module):
                self.steps_done = self.schedule.steps  # the budget is spent: no further steps
                return
            self.prune_step(trainer, pl_module, step, batch)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        write_to_checkpoint(checkpoint, pl_module, self.network_attribute)

    def progress_state(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "reference": self.reference, "reference_widths": self.reference_widths,
                "records": self.records, "input_size": self.input_size,
                "budget": self.budget.summary() if self.budget is not None else None,
                "lr_rewind_state": self.lr_rewind_state,
                "latency_model": self.latency_model.as_dict() if self.latency_model is not None else None}

    def load_progress_state(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.reference = state_dict.get("reference")
        self.reference_widths = state_dict.get("reference_widths")
        self.records = list(state_dict.get("records", []))
        self.input_size = state_dict.get("input_size") or self.input_size
        if self.budget is not None:
            self.budget = MiouBudget.from_dict(state_dict.get("budget"), self.max_miou_drop, self.budget_backoff)
        self.lr_rewind_state = state_dict.get("lr_rewind_state") or self.lr_rewind_state
        if state_dict.get("latency_model"):
            self.latency_model = LatencyModel.from_dict(state_dict["latency_model"])

    # ---- the pruning step ------------------------------------------------------------------------------

    def _due_steps(self, epoch: int) -> list[int]:
        """1-based steps whose epoch has come and that have not run (several after a resume that skipped)."""
        return [k for k, step_epoch in enumerate(self.schedule.step_epochs(), start=1)
                if k > self.steps_done and step_epoch <= epoch]

    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, batch: Any) -> None:
        network = self.network(pl_module)
        example = self._example(network, batch)
        if self.reference is None:
            self.reference = measure(network, example)
            self.reference_widths = layer_widths(network)
        if self.latency_model is not None:  # from a checkpoint, or assigned before the fit
            self.reference.setdefault("latency", self.latency_model.reference_ms)
        fraction = self.schedule.fraction_after(step)
        if self.budget is not None:  # after an undone step: halfway between what is kept and what failed
            fraction = self.budget.target_fraction(fraction)
        payload = self._decide(trainer, pl_module, network, example, step, fraction) if trainer.is_global_zero \
            else None
        payload = trainer.strategy.broadcast(payload, src=0)  # every rank applies rank 0's decision
        if payload.get("latency_model") and self.latency_model is None:  # built on rank 0 in this step
            self._set_latency_model(LatencyModel.from_dict(payload["latency_model"]))
        if "error" not in payload:
            event = CompressionEvent(KIND, step, network, trainer.current_epoch, trainer.global_step,
                                     plan=payload["history"])
            if self.budget is not None:
                self._restore_point = restore_point(network)
            rollback = _snapshot(network)

            def apply() -> nn.Module:
                prune_with_history(network, payload["history"], example)
                return network

            try:
                run_compression_step(trainer, pl_module, event, apply, lambda: _restore(network, rollback),
                                     bn_batches=self.bn_batches)
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
        point, current = self._restore_point, _snapshot(network)
        event = CompressionEvent(KIND, step, network, trainer.current_epoch, trainer.global_step, plan=[])

        def apply() -> nn.Module:
            restore(network, point)
            return network

        run_compression_step(trainer, pl_module, event, apply, lambda: _restore(network, current),
                             bn_batches=self.bn_batches)
        kept = self.budget.kept_fraction()
        self.records.append({"step": step, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                             "undone": True, "miou_drop_points": check["drop_points"],
                             "achieved_fraction": kept})
        more = (f"; the next step aims at {self.budget.target_fraction(self.schedule.amount):.3f}"
                if self.budget.backoff and step < self.schedule.steps else "")
        rank_zero_info(f"StructuredPruning: step {step} cost {check['drop_points']:.2f} mIoU points after "
                       f"fine-tuning (max_miou_drop {self.max_miou_drop}); undone. The fit keeps "
                       f"{kept:.3f} of {self.target} removed{more}.")

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                example: torch.Tensor, step: int, fraction: float) -> dict:
        """Plan a step on rank 0 and pass it through the plan filters: a plain-data pruning history, or the error
        that prevented it. With ``target: latency`` the payload also carries the latency model (built here, before
        the first step) for the other ranks."""
        payload = self._plan(trainer, pl_module, network, example, step, fraction)
        if self.latency_model is not None:
            payload["latency_model"] = self.latency_model.as_dict()
        return payload

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
              example: torch.Tensor, step: int, fraction: float) -> dict:
        try:
            config = PruningConfig(
                ignored_layers=sorted(set(self._ignored) | set(find_classifier_layers(network, example))),
                round_to=self.round_to, global_pruning=self.global_pruning,
                max_layer_fraction=self.max_layer_fraction, reference_widths=self.reference_widths,
                tolerance=self.rel_tolerance,
            )
            if self.target == "latency" and self.latency_model is None:
                self._build_latency_model(network, example, config)
            importance, weights = build_importance(self.importance, **self.importance_args), None
            if self.target == "latency" and self.latency_ranking:
                costs = model_group_costs(self.latency_model, network, example, config.ignored_layers,
                                          round_to=self.round_to)
                importance, weights = KeepBest(importance, min_channels=self.round_to or 8), weights_from_costs(costs)
            with self._taylor_gradients(network), _seeded(self.seed + step):
                plan = plan_step(network, example, importance, self.target, fraction, self.reference[self.target],
                                 config, group_weights=weights, latency_model=self.latency_model)
        except Exception as err:  # noqa: BLE001 - broadcast to all ranks, then raised or skipped
            return {"error": f"{type(err).__name__}: {err}"}
        bisecting = self.budget is not None and self.budget.ceiling is not None  # an approximate target
        if step == self.schedule.steps and not plan.within_tolerance and not bisecting:
            message = (f"the closest plan removes {plan.achieved_fraction:.3f} of {self.target}, not {fraction:.3f} "
                       f"(rel_tolerance {self.rel_tolerance:.0%}). Lower round_to, raise max_layer_fraction, un-ignore "
                       "layers or raise rel_tolerance.")
            if self.target == "latency":
                model = self.latency_model
                message += (f" Of the {model.reference_ms:.1f} ms on {model.runtime}, {model.constant_ms:.1f} ms are "
                            "outside the prunable layers (transposes, resizes, the classifier, untimed layers) and do "
                            "not shrink.")
            unused = unused_layers(network, example) if self.target == "params" else {}
            if unused:
                message += (f" Note: {sum(unused.values()):,} parameters sit in layers the forward never runs "
                            f"({', '.join(list(unused)[:4])}); they count as params but cannot be pruned: delete "
                            "them from the network or target macs.")
            return {"error": message}
        event = CompressionEvent(KIND, step, network, trainer.current_epoch, trainer.global_step,
                                 plan=plan.history)
        try:
            history = filter_plan(trainer, pl_module, event)
        except Exception as err:  # noqa: BLE001 - a filter failed: broadcast, then raised or skipped
            return {"error": f"a plan filter failed: {type(err).__name__}: {err}"}
        return {"history": history, "plan": {**plan.as_dict(), "groups_planned": len(plan.history),
                                             "groups_applied": len(history)}}

    def _build_latency_model(self, network: nn.Module, example: torch.Tensor, config: PruningConfig) -> None:
        """Time the unpruned network's prunable layers on the runtime (rank 0, before the first step)."""
        timer = self.latency_timer if self.latency_timer is not None else RuntimeTimer(self.runtime, self.threads)
        rank_zero_info(f"StructuredPruning: timing the network's layers on {self.runtime} at "
                       f"{list(example.shape)} for target latency (once; kept in checkpoints)...")
        model = build_latency_model(network, example, self.runtime, ignored_layers=config.ignored_layers,
                                    round_to=self.round_to, timer=timer)
        rank_zero_info(f"StructuredPruning: latency model built in {model.build_s:.0f} s ({model.timings} layer "
                       f"timings): {model.reference_ms:.1f} ms measured = {model.scale:.2f} x the "
                       f"{len(model.layers)} modelled layers + {model.constant_ms:.1f} ms.")
        self._set_latency_model(model)

    def _set_latency_model(self, model: LatencyModel) -> None:
        self.latency_model = model
        self.reference["latency"] = model.reference_ms

    def _measured_ms(self, network: nn.Module, example: torch.Tensor) -> tuple[float | None, str | None]:
        """The pruned network's latency measured once on the runtime (rank 0); a failure is reported, not raised."""
        timer = self.latency_timer if self.latency_timer is not None else RuntimeTimer(self.runtime, self.threads)
        try:
            return float(timer.time_network(network, example)), None
        except Exception as err:  # noqa: BLE001 - the step is done; only the check is missing
            return None, f"{type(err).__name__}: {str(err)[:300]}"

    def _example(self, network: nn.Module, batch: Any) -> torch.Tensor:
        if self.input_size is None:
            image = example_input(network, reference=batch, batch_size=1)
            self.input_size = list(image.shape[-2:])
        return example_input(network, size=tuple(self.input_size), batch_size=1)

    @contextlib.contextmanager
    def _taylor_gradients(self, network: nn.Module):
        """Install the mean of the accumulated gradients as ``.grad`` while Taylor importance is scored."""
        if self.importance != "taylor":
            yield
            return
        if not self._grad_sum:
            raise PruningError("taylor importance has no gradients: no optimizer step ran in this epoch before "
                               "the pruning step. Use another importance or give the epoch training batches.")
        saved = {}
        for name, p in network.named_parameters():
            saved[name] = p.grad
            summed = self._grad_sum.get(name)
            p.grad = summed / self._grad_batches if summed is not None else torch.zeros_like(p)
        try:
            yield
        finally:
            for name, p in network.named_parameters():
                p.grad = saved.get(name)
            self._grad_sum, self._grad_batches = {}, 0

    def _report(self, trainer, network: nn.Module, example: torch.Tensor, step: int, plan: dict,
                batchnorm=None) -> None:
        after = measure(network, example)
        latency = {}
        if self.latency_model is not None and "latency" in self.reference:
            after["latency"] = self.latency_model.predict(network)
            measured, error = self._measured_ms(network, example) if trainer.is_global_zero else (None, None)
            reference = self.latency_model.reference_ms
            latency = {"runtime": self.latency_model.runtime, "threads": self.latency_model.threads,
                       "reference_ms": reference, "predicted_ms": after["latency"], "measured_ms": measured,
                       "measured_fraction": None if measured is None else 1.0 - measured / reference}
            if error:
                latency["measured_error"] = error
        record = {"step": step, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "requested_fraction": plan["requested_fraction"],
                  "achieved_fraction": 1.0 - after[self.target] / self.reference[self.target],
                  "planned_fraction": plan["achieved_fraction"], "channel_ratio": plan["ratio"],
                  "groups_planned": plan["groups_planned"], "groups_applied": plan["groups_applied"], **after,
                  **{f"{k}_fraction_kept": after[k] / self.reference[k] for k in after},
                  **latency, "bn_reestimation": batchnorm.as_dict() if batchnorm is not None else None,
                  "channels_per_layer": layer_widths(network)}
        self.records.append(record)
        if not trainer.is_global_zero:
            return
        scalars = {f"pruning/{k}": float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        self._write_steps(trainer)
        rank_zero_info(
            f"StructuredPruning step {step}/{self.schedule.steps} (epoch {trainer.current_epoch}): removed "
            f"{record['achieved_fraction']:.3f} of {self.target} (requested {record['requested_fraction']:.3f}); "
            f"params {after['params']:,} ({record['params_fraction_kept']:.2f} kept), MACs {after['macs']:,} "
            f"({record['macs_fraction_kept']:.2f} kept)." + (
                f" Latency on {latency['runtime']}: {latency['predicted_ms']:.1f} ms predicted, "
                + (f"{latency['measured_ms']:.1f} ms measured" if latency["measured_ms"] is not None
                   else f"not measured ({latency.get('measured_error')})")
                + f" (unpruned {latency['reference_ms']:.1f} ms)." if latency else "")
        )

    def _write_steps(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        out = self.run_dir(trainer, "pruning")
        out.mkdir(parents=True, exist_ok=True)
        (out / "pruning_steps.json").write_text(json.dumps(self.records, indent=1))
        if self.budget is not None:
            (out / "pruning_budget.json").write_text(json.dumps(self.budget.summary(), indent=1))


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
