"""The ``segcompress`` command: LightningCLI with the reference module and synthetic data as defaults."""

from __future__ import annotations

import os

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from lightning_segcompress.data import SyntheticScenesDataModule
from lightning_segcompress.models import SegmentationModule


class SegCompressCLI(LightningCLI):
    """``segcompress {fit,validate,test,predict} --config recipe.yaml``.

    ``model`` and ``data`` accept any LightningModule / LightningDataModule by ``class_path``; without one
    they default to :class:`SegmentationModule` and :class:`SyntheticScenesDataModule`.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "model": {"class_path": f"{SegmentationModule.__module__}.{SegmentationModule.__name__}"},
            "data": {"class_path": f"{SyntheticScenesDataModule.__module__}.{SyntheticScenesDataModule.__name__}"},
        })

    def after_fit(self) -> None:
        print(format_fit_summary(self.trainer))


def format_fit_summary(trainer: pl.Trainer) -> str:
    """Final validation metrics and the best checkpoint, printed once after ``fit``."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    lines = ["", "segcompress fit finished:"]
    lines += [f"  {name} = {value:.4f}" for name, value in sorted(metrics.items())]
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if checkpoint:
        lines.append(f"  best checkpoint: {checkpoint}")
    return "\n".join(lines)


def main(args=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    SegCompressCLI(args=args)


if __name__ == "__main__":
    main()
