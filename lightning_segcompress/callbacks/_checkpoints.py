"""Replaying a checkpoint's compression state before Lightning loads its weights."""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_segcompress.state import restore_from_checkpoint


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
