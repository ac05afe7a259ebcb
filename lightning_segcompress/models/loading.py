"""The one loader of every ``segcompress`` tool (benchmark, memory, shunt, export): a network from a checkpoint, a
network spec or a recipe, compressed checkpoints included.

Heavy imports (torch, Lightning, smp) happen inside the functions, so that ``segcompress <tool> --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_MODEL_CLASS = "lightning_segcompress.SegmentationModule"


def load_network(
    ckpt: str | None = None,
    network: dict[str, Any] | None = None,
    recipe: str | None = None,
    model_class: str | None = None,
    num_classes: int | None = None,
    network_attribute: str | None = None,
):
    """The segmentation network (an ``nn.Module`` on the CPU) of one source:

    - ``ckpt``: a Lightning checkpoint (compressed ones too: the stages are replayed). The LightningModule is built
      from ``recipe``'s ``model:`` section when given, else as ``model_class(**checkpoint["hyper_parameters"])``
      (``model_class`` default: the class LightningCLI recorded in the checkpoint, else ``SegmentationModule``).
    - ``network``: a network spec ``{"class_path": ..., "init_args": {...}}`` (random weights).
    - ``recipe`` alone: the ``model:`` of a ``segcompress`` YAML config (random weights).
    """
    from lightning_segcompress.utils.inspection import find_network

    if network is not None and (ckpt is not None or recipe is not None):
        raise ValueError("Give a network spec (--network) alone, or a checkpoint (--ckpt, with --recipe when its "
                         "module needs the recipe's model config), or a recipe (--recipe).")
    if network is None and ckpt is None and recipe is None:
        raise ValueError("Give what to load: a checkpoint (--ckpt), a network spec (--network) or a recipe "
                         "(--recipe).")
    if network is not None:
        from lightning_segcompress.models.factory import build_network

        return build_network(network, num_classes=num_classes)
    if ckpt is None:
        return find_network(module_from_recipe(recipe), network_attribute)
    return find_network(load_module(ckpt, recipe, model_class), network_attribute)


def load_module(ckpt: str, recipe: str | None = None, model_class: str | None = None):
    """The LightningModule of checkpoint ``ckpt`` with its compression replayed and its weights loaded (CPU)."""
    from lightning_segcompress.models.factory import resolve_class_path
    from lightning_segcompress.state.checkpoint import _load_compressed
    from lightning_segcompress.utils.checkpoint_io import read_checkpoint

    checkpoint = read_checkpoint(ckpt)
    if recipe is not None:
        module = module_from_recipe(recipe)
    else:
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        model_class = model_class or hparams.get("_class_path") or DEFAULT_MODEL_CLASS
        cls = resolve_class_path(model_class)
        try:
            # LightningCLI adds _class_path / _instantiator to the hyperparameters
            module = cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})
        except TypeError as err:
            raise ValueError(f"Cannot build {model_class} from the hyperparameters stored in {ckpt} ({err}). Give "
                             "--model_class (the LightningModule that wrote it) or --recipe (a config with its "
                             "model: section).") from None
    return _load_compressed(module, checkpoint, ckpt)


def _datamodule(spec: dict[str, Any], stage: str):
    from lightning_segcompress.models.factory import resolve_class_path

    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"--data is a LightningDataModule spec {{'class_path': ..., 'init_args': {{...}}}}, got "
                         f"{spec!r}.")
    datamodule = resolve_class_path(spec["class_path"])(**dict(spec.get("init_args") or {}))
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


def load_validation_batches(spec: dict[str, Any], count: int):
    """The LightningDataModule of ``spec`` (``{"class_path", "init_args"}``), set up for validation, and its first
    ``count`` labelled validation batches as ``(images, masks)``; one clear error without any."""
    from itertools import islice

    from lightning_segcompress.utils.batch import split_batch

    datamodule = _datamodule(spec, "validate")
    labelled = (pair for pair in map(split_batch, datamodule.val_dataloader()) if pair[1] is not None)
    batches = list(islice(labelled, count))
    if not batches:
        raise ValueError(f"{spec['class_path']} has no labelled validation batches to score the model on.")
    return datamodule, batches


def load_training_images(spec: dict[str, Any], count: int, input_size, batch_size: int) -> list:
    """The images of the first ``count`` training batches of the data module ``spec``, fitted to ``input_size``
    (:func:`~lightning_segcompress.benchmark.accuracy.fit_to_input`) and regrouped into ``[batch_size, C, H, W]``
    batches (calibration data for a static-shape file); one clear error without any."""
    from itertools import islice

    import torch

    from lightning_segcompress.benchmark.accuracy import fit_to_input
    from lightning_segcompress.utils.batch import split_batch

    datamodule = _datamodule(spec, "fit")
    images = [fit_to_input(split_batch(batch)[0].detach().cpu().float(), list(input_size))
              for batch in islice(datamodule.train_dataloader(), count)]
    if not images:
        raise ValueError(f"{spec['class_path']} has no training batches to calibrate on.")
    flat = torch.cat(images)
    usable = flat.shape[0] - flat.shape[0] % batch_size
    if usable == 0:
        raise ValueError(f"{flat.shape[0]} calibration images are fewer than the batch size {batch_size}.")
    return list(flat[:usable].split(batch_size))


def module_from_recipe(path: str):
    """Instantiate the ``model:`` section of a LightningCLI config (random weights) the way ``segcompress`` does."""
    import pytorch_lightning as pl
    import yaml
    from jsonargparse import ArgumentParser

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"The recipe {path} does not exist (or is not a file); give a segcompress YAML "
                                "config such as recipes/quickstart.yaml.")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"The recipe {path} is not valid YAML: {err}") from None
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path} has no 'model:' section; give a segcompress/LightningCLI config.")
    model = dict(config["model"])
    model.get("init_args", {}).pop("weights", None)  # the checkpoint, not the recipe's start weights, is loaded
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    return parser.instantiate_classes(parser.parse_object({"model": model})).model
