"""``segcompress fit|validate|test|predict``: LightningCLI with the reference module and synthetic data as defaults."""

from __future__ import annotations

import inspect
import sys
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from lightning_segcompress.data import SyntheticScenesDataModule
from lightning_segcompress.models import SegmentationModule
from lightning_segcompress.models.factory import resolve_class_path

SUBCOMMANDS = ("fit", "validate", "test", "predict")
MODEL_WEIGHTS = "--model.init_args.weights"


class SegCompressCLI(LightningCLI):
    """``segcompress {fit,validate,test,predict} --config recipe.yaml``.

    ``model`` and ``data`` accept any LightningModule / LightningDataModule by ``class_path``; without one
    they default to :class:`SegmentationModule` and :class:`SyntheticScenesDataModule`.

    ``--weights trained.ckpt`` (or ``weights:`` at the top of a config) starts any model from trained weights before
    the run: how a recipe compresses an already trained model. ``--model.init_args.weights`` means the same for a
    model class that has no ``weights`` argument of its own.
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
        parser.add_argument(
            "--weights", type=Optional[str], default=None,  # noqa: UP045 (jsonargparse type)
            help="Start the model from this file before the run (a Lightning checkpoint of the same module, "
                 "compressed ones too, or a state dict of its network): compress an already trained model.")
        parser.add_argument(
            "--network_attribute", type=Optional[str], default=None,  # noqa: UP045 (jsonargparse type)
            help="Attribute path of the network inside the model, for --weights holding only the network's "
                 "weights (default: found automatically).")

    def parse_arguments(self, parser, args) -> None:
        if args is not None and not isinstance(args, (list, tuple)):
            return super().parse_arguments(parser, args)
        given = list(sys.argv[1:] if args is None else args)
        changed = self._weights_for_any_model(parser, given)
        if changed == given:
            return super().parse_arguments(parser, args)
        self.config = parser.parse_args(changed)
        return None

    def _weights_for_any_model(self, parser, args: list[str]) -> list[str]:
        """``--model.init_args.weights=X`` -> ``--weights=X`` when the chosen model class takes no ``weights``."""
        value, rest = _pop_option(args, MODEL_WEIGHTS)
        if value is None:
            return args
        parsed = parser.parse_args(rest)
        config = parsed.get(parsed.get("subcommand") or "", parsed)
        class_path = config["model"]["class_path"]
        if "weights" in inspect.signature(resolve_class_path(class_path)).parameters:
            return args
        return rest + [f"--weights={value}"]

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        weights = self._get(self.config, "weights")
        if weights:
            from lightning_segcompress.state import load_weights

            load_weights(self.model, weights, self._get(self.config, "network_attribute"))
            rank_zero_info(f"segcompress: {type(self.model).__name__} starts from the weights in {weights}")

    def after_fit(self) -> None:
        print(format_fit_summary(self.trainer))


def _pop_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """The value of ``name`` (``name=value`` or ``name value``; the last one wins) and ``args`` without it."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i].startswith(name + "="):
            value = args[i].split("=", 1)[1]
        elif args[i] == name and i + 1 < len(args):
            value = args[i + 1]
            i += 1
        else:
            rest.append(args[i])
        i += 1
    return value, rest


def format_fit_summary(trainer: pl.Trainer) -> str:
    """Final validation metrics and the best checkpoint, printed once after ``fit``."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    lines = ["", "segcompress fit finished:"]
    lines += [f"  {name} = {value:.4f}" for name, value in sorted(metrics.items())]
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if checkpoint:
        lines.append(f"  best checkpoint: {checkpoint}")
    return "\n".join(lines)


def run(args: list[str] | None = None) -> SegCompressCLI:
    return SegCompressCLI(args=args)
