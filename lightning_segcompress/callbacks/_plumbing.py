"""Plumbing every compression callback shares: output folders, optimizer/scheduler rebuild after surgery,
DDP re-wrap, and carrying the compression state through checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from torch.nn.parallel import DistributedDataParallel

from lightning_segcompress.compression_state import restore_from_checkpoint


def run_dir(trainer: pl.Trainer, name: str, override: str | None = None) -> Path:
    """``override`` if given, else ``<trainer.log_dir or default_root_dir>/<name>``."""
    if override:
        return Path(override)
    # not trainer.log_dir: that property broadcasts, and these folders are written on rank 0 only (a hang)
    logger = trainer.logger
    base = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
    return Path(base) / name


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """Call ``configure_optimizers`` again after the network's parameters were replaced.

    Optimizer state (momentum, Adam moments) is kept for every parameter that survived unchanged; pruned
    parameters start fresh. Each LR scheduler continues from the old one's position (step count and current
    learning rates), so a poly/cosine schedule does not restart.
    """
    old_optimizers = list(trainer.optimizers)
    old_schedulers = list(trainer.lr_scheduler_configs)
    old_state = {p: state for opt in old_optimizers for p, state in opt.state.items()}
    trainer.strategy.setup_optimizers(trainer)
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in old_state:  # torch-pruning replaces every parameter it cuts, so survivors are unchanged
                    optimizer.state[p] = old_state[p]
    for old, new in zip(old_schedulers, trainer.lr_scheduler_configs):
        new.scheduler.load_state_dict(old.scheduler.state_dict())
        last_lrs = getattr(new.scheduler, "_last_lr", None)
        if last_lrs:
            for group, lr in zip(new.scheduler.optimizer.param_groups, last_lrs):
                group["lr"] = lr


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """DDP keeps buckets of the old parameters: wrap the module again so gradients of the new ones sync."""
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "_setup_model"):
        strategy.model = strategy._setup_model(strategy.lightning_module)
        if hasattr(strategy, "_register_ddp_hooks"):
            strategy._register_ddp_hooks()


def install_checkpoint_restore(pl_module: pl.LightningModule) -> None:
    """Make ``pl_module`` replay a checkpoint's compression state before Lightning loads its weights.

    Lightning calls ``LightningModule.on_load_checkpoint`` right before ``load_state_dict`` for fit, validate,
    test and predict with ``ckpt_path``; callbacks only hear of the checkpoint after the weights were loaded.
    So the module's hook is wrapped (on this instance only, undone by ``remove_checkpoint_restore``).
    """
    if getattr(pl_module, "_segcompress_restore_installed", False):
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict) -> None:
        restore_from_checkpoint(pl_module, checkpoint)
        return original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint
    pl_module._segcompress_restore_installed = True


def remove_checkpoint_restore(pl_module: pl.LightningModule) -> None:
    if pl_module.__dict__.pop("_segcompress_restore_installed", False):
        pl_module.__dict__.pop("on_load_checkpoint", None)
