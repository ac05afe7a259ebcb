"""Training helpers shared by the benchmark scripts: SyntheticScenes from the common arguments and one fit of
the reference SegmentationModule."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule


def synthetic_data(args) -> SyntheticScenesDataModule:
    """``--size``, ``--classes``, ``--num_train``, ``--num_val``, ``--batch_size``; always the same scenes."""
    return SyntheticScenesDataModule(num_classes=args.classes, image_size=(args.size, args.size),
                                     num_train=args.num_train, num_val=args.num_val, num_test=args.num_val,
                                     batch_size=args.batch_size, seed=0)


def fit(args, spec: dict, epochs: int, seed: int, lr: float, root: Path, callbacks=(), weights=None,
        bn_momentum: float | None = None, data=None, prepare=None,
        trainer_args: dict | None = None) -> tuple[float, SegmentationModule]:
    """Train ``spec`` (from ``weights`` if given) for ``epochs`` on ``data`` (default: :func:`synthetic_data`);
    returns the final val mIoU and the module. ``prepare(module)`` runs on the fresh module before the weights
    load (e.g. to prune it to the architecture the weights have). ``trainer_args`` are passed on to the
    ``Trainer`` (e.g. ``{"check_val_every_n_epoch": epochs}`` to validate only after the last epoch)."""
    pl.seed_everything(seed, verbose=False)
    model = SegmentationModule(spec, num_classes=args.classes, lr=lr)
    if prepare is not None:
        prepare(model)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    if weights is not None:
        model.load_state_dict(weights)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                         callbacks=list(callbacks), **(trainer_args or {}))
    trainer.fit(model, data if data is not None else synthetic_data(args))
    return float(trainer.callback_metrics["val_miou"]), model
