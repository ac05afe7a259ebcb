"""StructuredPruning: remove channels for real (torch-pruning DepGraph) on a schedule, during fit."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_segcompress.callbacks._checkpoints import install_checkpoint_restore, remove_checkpoint_restore
from lightning_segcompress.callbacks.protocol import (
    CompressionCallback,
    CompressionEvent,
    filter_plan,
    run_compression_step,
)
from lightning_segcompress.compression_state import write_to_checkpoint
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
from lightning_segcompress.pruning.graph import METRICS, _restore, _snapshot, unused_layers
from lightning_segcompress.pruning.importance import resolve_importance_class
from lightning_segcompress.pruning.search import check_supported
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
    requested fraction of ``target`` (MACs, params or channels of the unpruned model) is removed, hands the plan
    to the plan filters of the other compression callbacks (e.g. :class:`PostPruning`), applies what they keep
    once, and rebuilds the optimizers and LR schedulers (keeping their position). The classifier layers are
    found and protected automatically. The step is decided on rank 0 and broadcast, so DDP ranks stay identical.

    Checkpoints carry the pruning history as plain data: ``trainer.fit/validate/test/predict(ckpt_path=...)``
    restore the pruned architecture while this callback is attached, ``SegmentationModule.load_from_checkpoint``
    always does, and :func:`lightning_segcompress.load_compressed` does for any module in a fresh process.

    Args:
        amount: fraction of ``target`` to remove by the end of the schedule, in (0, 1).
        target: ``"macs"``, ``"params"`` or ``"channels"``; the achieved fraction lands within ``rel_tolerance``
            of ``amount`` (before plan filters, which may keep groups back).
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
        input_size: ``[H, W]`` of the example input used to trace the network and count MACs; default: the
            training batch's size.
        on_failure: ``"raise"`` (stop training) or ``"skip"`` (warn and keep training unpruned) when a step
            cannot be planned or applied. Either way the network is left exactly as before the step.
        network_attribute: attribute path of the network in the LightningModule (default: found automatically).
        output_dir: where ``pruning_steps.json`` goes; default ``<log_dir>/pruning``.
        seed: seed for ``random`` importance (the same on every rank).
        tolerance: deprecated spelling of ``rel_tolerance``.

    Example::

        trainer = Trainer(callbacks=[StructuredPruning(amount=0.5, target="macs", schedule="agp",
                                                       start_epoch=1, end_epoch=7, steps=3)])

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
        tolerance: float | None = None,
    ) -> None:
        rel_tolerance = self.take_renamed("tolerance", "rel_tolerance", tolerance,
                                         rel_tolerance, 0.03)
        self.schedule = PruningSchedule(kind=schedule, amount=amount, start_epoch=start_epoch,
                                        end_epoch=end_epoch, steps=steps)
        if target not in METRICS:
            raise ValueError(f"target must be one of {list(METRICS)}, got {target!r}.")
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
        if isinstance(ignored_layers, str):
            ignored_layers = [ignored_layers]
        self.target = target
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
        # progress, saved in checkpoints
        self.steps_done = 0
        self.reference: dict[str, int] | None = None
        self.reference_widths: dict[str, int] | None = None
        self.records: list[dict] = []
        # per-fit working state
        self._ignored: list[str] = []
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._grad_batches = 0

    # ---- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = self.network(pl_module)
        self._ignored = sorted(select_modules(network, self.ignored_patterns, "ignored_layers"))
        if stage == "fit":
            check_supported(network, self._ignored)
        install_checkpoint_restore(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_checkpoint_restore(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._grad_sum, self._grad_batches = {}, 0

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
            self.prune_step(trainer, pl_module, step, batch)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        write_to_checkpoint(checkpoint, pl_module, self.network_attribute)

    def progress_state(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "reference": self.reference, "reference_widths": self.reference_widths,
                "records": self.records, "input_size": self.input_size}

    def load_progress_state(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.reference = state_dict.get("reference")
        self.reference_widths = state_dict.get("reference_widths")
        self.records = list(state_dict.get("records", []))
        self.input_size = state_dict.get("input_size") or self.input_size

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
        fraction = self.schedule.fraction_after(step)
        payload = self._decide(trainer, pl_module, network, example, step, fraction) if trainer.is_global_zero \
            else None
        payload = trainer.strategy.broadcast(payload, src=0)  # every rank applies rank 0's decision
        if "error" not in payload:
            event = CompressionEvent(KIND, step, network, trainer.current_epoch, trainer.global_step,
                                     plan=payload["history"])
            restore_point = _snapshot(network)

            def apply() -> nn.Module:
                prune_with_history(network, payload["history"], example)
                return network

            try:
                run_compression_step(trainer, pl_module, event, apply, lambda: _restore(network, restore_point))
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
        self._report(trainer, network, example, step, payload["plan"])

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                example: torch.Tensor, step: int, fraction: float) -> dict:
        """Plan a step on rank 0 and pass it through the plan filters: a plain-data pruning history, or the error
        that prevented it."""
        try:
            config = PruningConfig(
                ignored_layers=sorted(set(self._ignored) | set(find_classifier_layers(network, example))),
                round_to=self.round_to, global_pruning=self.global_pruning,
                max_layer_fraction=self.max_layer_fraction, reference_widths=self.reference_widths,
                tolerance=self.rel_tolerance,
            )
            with self._taylor_gradients(network), _seeded(self.seed + step):
                plan = plan_step(network, example, build_importance(self.importance, **self.importance_args),
                                 self.target, fraction, self.reference[self.target], config)
        except Exception as err:  # noqa: BLE001 - broadcast to all ranks, then raised or skipped
            return {"error": f"{type(err).__name__}: {err}"}
        if step == self.schedule.steps and not plan.within_tolerance:
            message = (f"the closest plan removes {plan.achieved_fraction:.3f} of {self.target}, not {fraction:.3f} "
                       f"(rel_tolerance {self.rel_tolerance:.0%}). Lower round_to, raise max_layer_fraction, un-ignore "
                       "layers or raise rel_tolerance.")
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

    def _report(self, trainer, network: nn.Module, example: torch.Tensor, step: int, plan: dict) -> None:
        after = measure(network, example)
        record = {"step": step, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "requested_fraction": plan["requested_fraction"],
                  "achieved_fraction": 1.0 - after[self.target] / self.reference[self.target],
                  "planned_fraction": plan["achieved_fraction"], "channel_ratio": plan["ratio"],
                  "groups_planned": plan["groups_planned"], "groups_applied": plan["groups_applied"], **after,
                  **{f"{k}_fraction_kept": after[k] / self.reference[k] for k in after},
                  "channels_per_layer": layer_widths(network)}
        self.records.append(record)
        if not trainer.is_global_zero:
            return
        scalars = {f"pruning/{k}": float(v) for k, v in record.items() if k != "channels_per_layer"}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        out = self.run_dir(trainer, "pruning")
        out.mkdir(parents=True, exist_ok=True)
        (out / "pruning_steps.json").write_text(json.dumps(self.records, indent=1))
        rank_zero_info(
            f"StructuredPruning step {step}/{self.schedule.steps} (epoch {trainer.current_epoch}): removed "
            f"{record['achieved_fraction']:.3f} of {self.target} (requested {record['requested_fraction']:.3f}); "
            f"params {after['params']:,} ({record['params_fraction_kept']:.2f} kept), MACs {after['macs']:,} "
            f"({record['macs_fraction_kept']:.2f} kept)."
        )


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
