"""ShuntReplacement: replace a run of MobileNetV3 blocks with a small shunt, a producer of the compression protocol."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lightning_segcompress.callbacks._batchnorm import checked_bn_batches
from lightning_segcompress.callbacks._ddp import (
    average_gradients,
    broadcast_from_rank_zero,
    set_ddp_gradient_sync,
)
from lightning_segcompress.callbacks._input_size import training_input_size
from lightning_segcompress.callbacks._training import install_loss_term, remove_loss_term
from lightning_segcompress.callbacks._validation import validation_miou
from lightning_segcompress.callbacks.protocol import CompressionProducer
from lightning_segcompress.shunt import (
    VARIANTS,
    Block,
    Shunt,
    ShuntError,
    ShuntPlan,
    block_map,
    find_backbone,
    format_block_map,
    knowledge_quotients,
    plan_shunt,
    resolve_range,
    select_range,
    shunt_stage,
    splice,
)
from lightning_segcompress.shunt.surgery import STAGE_KIND, modules_before, restored_on_failure
from lightning_segcompress.utils.inspection import count_macs, count_params, example_input
from lightning_segcompress.utils.precision import autocast_disabled, follow
from lightning_segcompress.utils.shapes import checked_input_size

RESOURCES = ("params", "macs")


class ShuntReplacement(CompressionProducer):
    """Replace a run of MobileNetV3 blocks with one small shunt block (after Haas et al. 2021) within one fit.

    At fit start the backbone's block map is built (shapes, strides, dilations, which block outputs the decoder
    reads) and the range is chosen: given, or (``blocks="auto"``) the contiguous range with the lowest total
    knowledge quotient (KQ = 1 - mIoU without the block / mIoU, measured per residual block on ``eval_batches``
    validation batches) that meets ``target``.

    Stage A (the first ``stage_a_epochs`` epochs, or ``stage_a_steps`` optimizer steps): the network is frozen
    (eval mode, no gradients) and only the shunt trains, with its own Adam, on the MSE between its output and the
    range's output; the module's loss is replaced by that MSE (logged as ``shunt/stage_a_mse``), the validation
    still measures the original. Stage B (the rest of the fit): the shunt is spliced in, everything is unfrozen
    (except the layers before the shunt with ``freeze_before_shunt``), the optimizers are rebuilt, and the module's
    own loss trains the whole network.

    The splice is a step of the compression protocol (kind ``"shunt"``): every :class:`CompressionCallback` of the
    fit hears of it before (network still unspliced) and after. Stage-B distillation from the original network
    (the publication's recipe: ACE, kappa 0.3) is therefore :class:`KnowledgeDistillation` listed next to this
    callback with ``teacher="snapshot", snapshot_at="before_compression"``: it takes the unspliced network as its
    teacher at the splice (see the example).

    Checkpoints store the replaced blocks and the shunt's configuration as plain data: a resumed fit,
    ``load_from_checkpoint`` and :func:`lightning_segcompress.load_compressed` splice the shunt again before the
    weights load. A report (block map, KQ, chosen range, sizes, mIoU before and after stage A) is written to
    ``<output_dir>/shunt_report.md``.

    Args:
        blocks: ``"auto"`` or ``[first, last]`` (block indices from the block map, or block module names).
        target: for ``"auto"``: ``{"params": fraction}`` or ``{"macs": fraction}`` of the whole network the shunt
            must remove (net of its own size).
        variant: shunt architecture: ``"arch1"`` (two units 192/64, up to 2 downsamples; the paper's default),
            ``"one_block"`` (one 128-wide unit, up to 1), ``"three_blocks"`` (up to 3).
        widths: override the variant's ``[[expanded, out], ...]`` channels per unit.
        stage_a_epochs: epochs of shunt-only training before the splice, counted from this fit's first epoch
            (0: splice at once).
        stage_a_steps: or optimizer steps (overrides ``stage_a_epochs``).
        shunt_lr: Adam learning rate of stage A.
        freeze_before_shunt: in stage B keep everything that runs before the shunt frozen.
        eval_batches: validation batches (labels needed) for the knowledge quotients and the mIoU before/after
            stage A; ``None``: all.
        ignore_index: label ignored by the mIoU.
        input_size: ``[H, W]`` of the example used for the block map, MACs (``target: {macs: ...}``) and shape
            checks; ``None`` (default): the size of the fit's training batches.
        output_dir: where the report goes (default ``<log dir>/shunt``).
        network_attribute: attribute path of the network in the LightningModule (default: found).
        bn_batches: training batches on which the BatchNorm statistics are re-estimated once the shunt is spliced
            in (the layers after it see the shunt's features now, not the replaced blocks'); 0 disables.
        distillation, alpha: removed (a ValueError says what to use): stage-B distillation is
            ``KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
            losses={"ace": {"kappa": 0.3}}, alpha=...)`` next to this callback.
        kq_batches, report_dir: deprecated spellings of ``eval_batches`` and ``output_dir``.

    Example::

        trainer = Trainer(max_epochs=12, callbacks=[
            ShuntReplacement(blocks="auto", target={"params": 0.25}, stage_a_epochs=3),
            KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
                                  losses={"ace": {"kappa": 0.3}}),
            DeviceBenchmark(runtimes=["torchscript_lite", "executorch"])])
    """

    kind = STAGE_KIND
    stage_applier = "lightning_segcompress.shunt.surgery:apply_stage"

    def __init__(
        self,
        blocks: str | list[int | str] = "auto",
        target: dict[str, float] | None = None,
        variant: str = "arch1",
        widths: list[list[int]] | None = None,
        stage_a_epochs: int = 1,
        stage_a_steps: int | None = None,
        shunt_lr: float = 1e-3,
        freeze_before_shunt: bool = False,
        eval_batches: int | None = 8,
        ignore_index: int = 255,
        input_size: list[int] | None = None,
        output_dir: str | None = None,
        network_attribute: str | None = None,
        distillation: bool | dict[str, Any] | None = None,
        alpha: float | None = None,
        kq_batches: int | None = None,
        report_dir: str | None = None,
        bn_batches: int = 32,
    ) -> None:
        _refuse_built_in_distillation(distillation, alpha)
        self.bn_batches = checked_bn_batches(bn_batches, "ShuntReplacement")
        eval_batches = self.take_renamed("kq_batches", "eval_batches", kq_batches, eval_batches, 8)
        output_dir = self.take_renamed("report_dir", "output_dir", report_dir, output_dir, None)
        if blocks != "auto" and not (isinstance(blocks, Sequence) and not isinstance(blocks, str)
                                     and len(blocks) == 2):
            raise ValueError(f"blocks is 'auto' or [first, last] (indices or names), got {blocks!r}.")
        if blocks == "auto":
            if not isinstance(target, Mapping) or len(target) != 1 or next(iter(target)) not in RESOURCES:
                raise ValueError(f"blocks='auto' needs target={{params: fraction}} or {{macs: fraction}}, got "
                                 f"{target!r}.")
            if not 0 < next(iter(target.values())) < 1:
                raise ValueError(f"the target fraction must be in (0, 1), got {target!r}.")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}.")
        if stage_a_epochs < 0 or (stage_a_steps is not None and stage_a_steps < 0):
            raise ValueError("stage_a_epochs and stage_a_steps must be >= 0.")
        if shunt_lr <= 0:
            raise ValueError(f"shunt_lr must be positive, got {shunt_lr}.")
        if eval_batches is not None and eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1 (or None for all), got {eval_batches}.")
        self.blocks = blocks if blocks == "auto" else list(blocks)
        self.target = dict(target) if target else None
        self.variant = variant
        self.widths = widths
        self.stage_a_epochs = stage_a_epochs
        self.stage_a_steps = stage_a_steps
        self.shunt_lr = shunt_lr
        self.freeze_before_shunt = freeze_before_shunt
        self.eval_batches = eval_batches
        self.ignore_index = ignore_index
        self.input_size = checked_input_size(input_size)  # None: the training batches' size, read at setup
        self.output_dir = output_dir
        self.network_attribute = network_attribute

        self.phase = "A"  # "A": training the shunt, "B": spliced
        self.plan: ShuntPlan | None = None
        self.block_map: list[Block] = []
        self.quotients: dict[str, float] | None = None
        self.scores: dict[str, float] = {}  # original / after stage A mIoU on the evaluation batches
        self.shunt: Shunt | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] = {}
        self._capture: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._frozen: list[nn.Parameter] = []
        self._kept_frozen: list[str] = []
        self._evaluate = None  # mIoU on the evaluation batches
        self.started: dict[str, int] | None = None  # epoch and step at which stage A began
        self._evaluated_batches = 0

    # ---- set-up ----------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ShuntError(f"{type(pl_module).__name__} uses manual optimization; ShuntReplacement replaces the "
                             "training loss in stage A and needs automatic optimization.")
        if self.input_size is None:
            self.input_size = training_input_size(trainer, pl_module, "ShuntReplacement")
        network = self.network(pl_module)
        if shunt_stage(network) is None:
            self._check_network(network)
        install_loss_term(pl_module, self.state_key, self._stage_a_term, first=True)

    def _check_network(self, network: nn.Module) -> None:
        """Block map and (for a given range) the plan: unsupported backbones and bad ranges fail at fit start."""
        find_backbone(network)
        example = example_input(network, size=tuple(self.input_size))
        self.block_map = block_map(network, example)
        if self.blocks != "auto" and self.plan is None:
            self.plan = plan_shunt(resolve_range(self.block_map, *self.blocks), self.variant, self.widths)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._remove_hooks()
            remove_loss_term(pl_module, self.state_key)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = self.network(pl_module)
        if shunt_stage(network) is not None:  # resumed after the splice, or the network came shunted
            self.phase = "B"
            self._apply_freeze_before(network)
            return
        evaluate, self._evaluated_batches = validation_miou(trainer, network, self.eval_batches, self.ignore_index)
        if "original_miou" not in self.scores and evaluate is not None:
            self.scores["original_miou"] = evaluate(network)
        if self.plan is None:
            self.plan = self._select(trainer, network, evaluate)
        if self.started is None:  # stage A counts from this fit's start (it may continue a trained checkpoint)
            self.started = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        self._evaluate = evaluate
        self._begin_stage_a(trainer, pl_module, network)

    def _select(self, trainer: pl.Trainer, network: nn.Module, evaluate) -> ShuntPlan:
        if evaluate is None:
            raise ShuntError("blocks='auto' ranks blocks by their knowledge quotient on validation data, but the fit "
                             "has no validation batches with labels; give the range, e.g. blocks: [5, 10].")
        self.quotients = knowledge_quotients(network, self.block_map, evaluate, self.scores.get("original_miou"))
        example = example_input(network, size=tuple(self.input_size))
        totals = {"params": count_params(network), "macs": count_macs(network, example)}
        plan = select_range(self.block_map, self.quotients, self.target, totals, self.variant, self.widths)
        # every rank must replace the same range (ranks measured KQ on different validation batches)
        names = trainer.strategy.broadcast(plan.names, src=0)
        if names != plan.names:
            plan = plan_shunt(resolve_range(self.block_map, names[0], names[-1]), self.variant, self.widths)
        rank_zero_info(f"ShuntReplacement: chose {plan.describe()} (KQ "
                       f"{sum(self.quotients.get(n, 0.0) for n in plan.names):.4f}).")
        return plan

    # ---- stage A ---------------------------------------------------------------------------------------------

    def _begin_stage_a(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> None:
        if self.shunt is None:
            self.shunt = follow(Shunt(self.plan.config), network)  # the network's device and dtype
            broadcast_from_rank_zero([*self.shunt.parameters(), *self.shunt.buffers()])
            self.optimizer = torch.optim.Adam(self.shunt.parameters(), lr=self.shunt_lr)
            if "shunt" in self._pending:
                self.shunt.load_state_dict(self._pending.pop("shunt"))
                self.optimizer.load_state_dict(self._pending.pop("shunt_optimizer"))
        if self._stage_a_over(trainer):
            return  # spliced at the first training epoch
        self._frozen = [p for p in network.parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        set_ddp_gradient_sync(trainer, False)
        first, last = network.get_submodule(self.plan.names[0]), network.get_submodule(self.plan.names[-1])
        self._handles = [
            first.register_forward_pre_hook(lambda module, inputs: self._capture.__setitem__("input", inputs[0])),
            last.register_forward_hook(lambda module, inputs, output: self._capture.__setitem__("output", output))]

    def _stage_a_over(self, trainer: pl.Trainer) -> bool:
        if self.stage_a_steps is not None:
            return trainer.global_step >= self.started["step"] + self.stage_a_steps
        return trainer.current_epoch >= self.started["epoch"] + self.stage_a_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase == "A" and self._stage_a_over(trainer):
            self.splice(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.phase == "A" and self._stage_a_over(trainer):
            self.splice(trainer, pl_module)
        network = self.network(pl_module)
        if self.phase == "A":
            network.eval()  # the original is frozen, BN statistics included
            self.shunt.train()
        else:
            for name in self._kept_frozen:
                network.get_submodule(name).eval()

    def _stage_a_term(self, loss: torch.Tensor, batch: Any, pl_module: pl.LightningModule) -> torch.Tensor:
        """The training loss: stage A's MSE in place of the module's loss, the module's loss in stage B."""
        if self.phase != "A":
            return loss
        if "input" not in self._capture or "output" not in self._capture:
            raise ShuntError(f"blocks {self.plan.names[0]} .. {self.plan.names[-1]} did not run in training_step, so "
                             "the shunt has nothing to learn from: training_step must call the network.")
        source, target = self._capture.pop("input").detach(), self._capture.pop("output").detach()
        predicted = self.shunt(source)  # under the trainer's autocast, like the network it replaces
        with autocast_disabled([source.device]):  # the error itself in float32
            mse = F.mse_loss(predicted.float(), target.float())
        pl_module.log("shunt/stage_a_mse", mse.detach(), on_step=True, on_epoch=True)
        return mse

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.phase != "A" or optimizer is not trainer.optimizers[0]:
            return
        params = list(self.shunt.parameters())
        average_gradients(trainer, params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._capture.clear()

    # ---- the splice and stage B ------------------------------------------------------------------------------

    def splice(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the shunt in place of the range and unfreeze, announced as a compression step (kind ``"shunt"``);
        on failure the network is left as it was (unspliced, frozen for stage A)."""
        network = self.network(pl_module)
        self._remove_hooks()
        flags = {p: p.requires_grad for p in network.parameters()}
        modes = {m: m.training for m in network.modules()}

        def apply() -> nn.Module:
            for p in self._frozen:
                p.requires_grad_(True)
            splice(network, self.plan.names, self.shunt)
            network.train(pl_module.training)  # stage A kept it in eval mode; stage B trains it
            self._apply_freeze_before(network)
            set_ddp_gradient_sync(trainer, True)
            return network

        def undo() -> None:  # stage A's frozen network again (the blocks come back with restored_on_failure)
            for m, mode in modes.items():
                m.training = mode
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self._kept_frozen = []
            set_ddp_gradient_sync(trainer, False)

        with restored_on_failure(network, self.plan.names):  # the blocks and the recorded stages
            self.compress(trainer, pl_module, network, apply, undo, bn_batches=self.bn_batches)
        self._frozen = []
        self.phase = "B"
        self.shunt, self.optimizer = None, None
        rank_zero_info(f"ShuntReplacement: spliced a shunt in place of {self.plan.describe()} at epoch "
                       f"{trainer.current_epoch}; params removed {self.plan.params_removed:,}, MACs removed "
                       f"{self.plan.macs_removed:,}.")
        if trainer.is_global_zero:
            if self._evaluate is not None:
                self.scores["stage_a_miou"] = self._evaluate(network)
            self.write_report(trainer, network)

    def _apply_freeze_before(self, network: nn.Module) -> None:
        if not self.freeze_before_shunt:
            return
        stage = shunt_stage(network)
        example = example_input(network, size=tuple(self.input_size))
        self._kept_frozen = modules_before(network, stage["blocks"][0], example)
        for name in self._kept_frozen:
            module = network.get_submodule(name)
            module.eval()  # BN statistics included (also as every stage-B batch starts)
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)

    # ---- report and checkpoints ------------------------------------------------------------------------------

    def write_report(self, trainer: pl.Trainer, network: nn.Module) -> None:
        folder = self.run_dir(trainer, "shunt")
        folder.mkdir(parents=True, exist_ok=True)
        plan = self.plan
        lines = ["# Shunt replacement", "",
                 f"Replaced {plan.describe()} with a {self.variant!r} shunt: "
                 f"{plan.params_removed:,} parameters and {plan.macs_removed:,} MACs removed "
                 f"(at input {self.input_size}); network now {count_params(network):,} parameters.", "",
                 f"Shunt units: {plan.config['units']}", ""]
        if self.quotients is not None:
            lines += [f"Range chosen automatically for target {self.target}, total KQ "
                      f"{sum(self.quotients.get(n, 0.0) for n in plan.names):.4f}.", ""]
        for key, label in (("original_miou", "original"), ("stage_a_miou", "after stage A (shunt spliced in)")):
            if key in self.scores:
                lines.append(f"- mIoU {label}: {self.scores[key]:.4f} (on {self._evaluated_batches} validation "
                             "batches)")
        lines += ["", "## Block map", "", format_block_map(self.block_map, self.quotients), ""]
        (folder / "shunt_report.md").write_text("\n".join(lines))

    def progress_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"phase": self.phase, "started": self.started, "scores": dict(self.scores),
                                 "quotients": self.quotients,
                                 "block_map": [b.as_dict() for b in self.block_map]}
        if self.plan is not None:
            state["plan"] = self.plan.names
        if self.shunt is not None:
            state["shunt"] = self.shunt.state_dict()
            state["shunt_optimizer"] = self.optimizer.state_dict()
        return state

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.phase = state.get("phase", "A")
        self.started = state.get("started")
        self.scores = dict(state.get("scores", {}))
        self.quotients = state.get("quotients")
        self.block_map = [Block(**{**b, "in_shape": tuple(b["in_shape"]), "out_shape": tuple(b["out_shape"])})
                          for b in state.get("block_map", [])]
        if "plan" in state and self.block_map:
            names = state["plan"]
            self.plan = plan_shunt(resolve_range(self.block_map, names[0], names[-1]), self.variant, self.widths)
        self._pending = {k: state[k] for k in ("shunt", "shunt_optimizer") if k in state}


def _refuse_built_in_distillation(distillation: Any, alpha: Any) -> None:
    """``distillation=`` / ``alpha=`` were removed: distillation is :class:`KnowledgeDistillation`'s job."""
    if distillation is None and alpha is None:
        return
    given = ", ".join(f"{name}={value!r}" for name, value in (("distillation", distillation), ("alpha", alpha))
                      if value is not None)
    if distillation is False and alpha is None:
        fix = "drop the argument: without KnowledgeDistillation next to it, stage B uses the module's own loss only"
    else:
        losses = json.dumps(dict(distillation) if isinstance(distillation, Mapping) else {"ace": {"kappa": 0.3}})
        kd = f'teacher="snapshot", snapshot_at="before_compression", losses={losses}'
        yaml = f"teacher: snapshot, snapshot_at: before_compression, losses: {losses}"
        if alpha is not None:
            kd, yaml = f"{kd}, alpha={alpha!r}", f"{yaml}, alpha: {alpha!r}"
        fix = (f"remove {'them' if distillation is not None and alpha is not None else 'it'} and add "
               f"KnowledgeDistillation({kd}) next to ShuntReplacement in the trainer's callbacks "
               f"(YAML: class_path: lightning_segcompress.callbacks.KnowledgeDistillation, init_args: {{{yaml}}}); "
               "it distils from the network as it was right before the splice")
    raise ValueError(f"ShuntReplacement({given}): stage-B distillation moved out of ShuntReplacement; {fix}.")
