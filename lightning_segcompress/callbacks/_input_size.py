"""``input_size=None`` in a callback: the ``[H, W]`` of the fit's training batches.

A callback that gets a training batch before it needs the size takes it from that batch
(:func:`~lightning_segcompress.utils.shapes.batch_input_size`). One that needs it earlier (at ``setup``, at fit
start, for a step taken at an epoch's start) calls :func:`training_input_size`, which reads one batch of the fit's
training data the way the training loop gets it (through the module's batch hooks), without changing what the
training draws next (the random number generators are put back), once per fit: the callbacks of one trainer share
it. Only where the fit has no training batch to read is the old default used, and that is logged."""

from __future__ import annotations

import contextlib
import random
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from lightning_segcompress.callbacks._batchnorm import _fresh
from lightning_segcompress.utils.shapes import FALLBACK_INPUT_SIZE, batch_input_size

# trainer -> (id of the fit's data source, [H, W]): what one callback read, the others of the fit reuse
_READ: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def training_input_size(trainer: pl.Trainer | None, pl_module: pl.LightningModule, owner: str,
                        default: Sequence[int] = FALLBACK_INPUT_SIZE, synchronize: bool = True) -> list[int]:
    """``[H, W]`` of the fit's training batches, for a callback given ``input_size=None``: read from the first batch
    of the fit's training data (the trainer's training dataloader, or where the fit gets it from: the datamodule or
    the loaders given to ``fit``), ``default`` (logged) where there is none. ``synchronize``: every rank calls this
    together and takes global rank 0's size (False: one rank alone, e.g. inside a plan filter)."""
    if trainer is None:  # a hook called outside a fit
        size, reason = None, "there is no trainer"
    elif (known := _READ.get(trainer)) is not None and known[0] == _source_key(trainer):
        size, reason = list(known[1]), None
    else:
        size, reason = None, "the fit has no training batch"
        if trainer.is_global_zero or not synchronize:
            size, reason = _read(trainer, pl_module)
        if synchronize and trainer.world_size > 1:
            size, reason = trainer.strategy.broadcast((size, reason), src=0)
        if size is not None:
            _READ[trainer] = (_source_key(trainer), list(size))
    if size is None:
        size = [int(s) for s in default]
        rank_zero_info(f"{owner}: input_size=None is the [H, W] of the fit's training batches, but {reason}; using "
                       f"input_size={size} (give input_size to choose another).")
        return size
    rank_zero_info(f"{owner}: input_size=None: {list(size)}, the [H, W] of the fit's training batches.")
    return list(size)


def _source_key(trainer: pl.Trainer) -> int | None:
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    return None if source is None else id(source.instance)


def _read(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list[int] | None, str | None]:
    """``([H, W], None)`` of one training batch, or ``(None, why not)``."""
    try:
        loader = _training_loader(trainer)
    except Exception as err:  # noqa: BLE001 - e.g. a module whose loader needs its own setup first
        return None, f"its training data could not be read ({type(err).__name__}: {err})"
    if loader is None:
        return None, "the fit has no training data"
    try:
        with _random_state_kept(loader):
            batch = next(iter(_fresh(loader)), None)
            if batch is None:
                return None, "its training data is empty"
            batch = _transferred(pl_module, batch)
    except Exception as err:  # noqa: BLE001 - the training loop reports a broken loader itself
        return None, f"its first training batch could not be read ({type(err).__name__}: {err})"
    try:
        return batch_input_size(batch), None
    except TypeError as err:
        return None, f"its training batch holds no image tensor ({err})"


def _training_loader(trainer: pl.Trainer) -> Any:
    """The fit's (first) training loader, without setting up the fit loop's data ahead of Lightning."""
    loaders = trainer.train_dataloader
    if loaders is None:
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or source.instance is None or not source.is_defined():
            return None
        loaders = source.dataloader()
    while True:
        if isinstance(loaders, CombinedLoader):
            loaders = loaders.iterables
        elif isinstance(loaders, (Mapping, Sequence)) and not isinstance(loaders, (DataLoader, str)):
            if not loaders:
                return None
            loaders = next(iter(loaders.values())) if isinstance(loaders, Mapping) else loaders[0]
        else:
            return loaders


def _transferred(pl_module: pl.LightningModule, batch: Any) -> Any:
    """``batch`` through the module's (and datamodule's) batch hooks, as the training loop hands it over (on the
    CPU); the batch as loaded where a hook needs more than that (e.g. a running training loop)."""
    try:
        moved = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        return pl_module._apply_batch_transfer_handler(moved, device=torch.device("cpu"), dataloader_idx=0)
    except Exception:  # noqa: BLE001 - the loaded batch has the size the hooks received
        return batch


@contextlib.contextmanager
def _random_state_kept(loader: Any) -> Iterator[None]:
    """Samplers, workers' seeds and augmentations draw from the global generators and from the loader's own (its
    ``generator``, its sampler's): put them all back afterwards."""
    sampler = getattr(loader, "sampler", None)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    owned = {id(g): g for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
                                getattr(inner, "generator", None)) if isinstance(g, torch.Generator)}
    generator_states = [(g, g.get_state()) for g in owned.values()]
    python_state = random.getstate()
    try:
        import numpy as np

        numpy_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch
        np, numpy_state = None, None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for generator, state in generator_states:
            generator.set_state(state)
        random.setstate(python_state)
        if np is not None:
            np.random.set_state(numpy_state)
