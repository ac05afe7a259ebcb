"""BatchNorm re-estimation inside a fit: the training batches come through the module's own batch handling (as the
training loop does it), the passes run under the trainer's precision, and every DDP rank ends with the same
statistics. The algorithm is :func:`lightning_segcompress.utils.batchnorm.reestimate_batchnorm`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_segcompress.utils.batch import split_batch
from lightning_segcompress.utils.batchnorm import (
    BatchNormError,
    BatchNormReport,
    reestimate_batchnorm,
    reestimated_layers,
)
from lightning_segcompress.utils.inspection import module_device


def checked_bn_batches(value: int, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}(bn_batches=...) is the number of training batches BatchNorm statistics are "
                         f"re-estimated on after each change of the network: an integer >= 0 (0 disables), got "
                         f"{value!r}.")
    return value


def reestimate_statistics(trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, count: int,
                          synchronize: bool = True, label: str = "") -> BatchNormReport | None:
    """Re-estimate ``network``'s BatchNorm statistics on the first ``count`` training batches of this fit (fewer
    when an epoch has fewer: ``limit_train_batches`` counts). ``synchronize``: every rank calls this together and
    the statistics are those of all ranks' batches (False: one rank alone, e.g. inside a plan filter). Returns
    the report (None when there is nothing to do) and logs the time it took."""
    if count == 0 or not reestimated_layers(network):
        return None
    count = _clamped(trainer, count)
    reduce = None
    if synchronize and trainer.world_size > 1:
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(tensor, reduce_op="sum")
    device = module_device(network)

    def forward(images: torch.Tensor):
        with trainer.precision_plugin.forward_context():
            return network(images.to(device))

    # the passes must not change what the training draws next (samplers and dropout take from the global RNG)
    try:
        with torch.random.fork_rng(devices=[]):
            report = reestimate_batchnorm(network, training_images(trainer, pl_module, count), count, reduce,
                                          forward)
    except BatchNormError as err:
        raise BatchNormError(f"{err} (bn_batches={count}; bn_batches=0 skips the re-estimation)") from err
    if synchronize and trainer.is_global_zero:
        metrics = {"batchnorm/reestimation_s": report.seconds, "batchnorm/layers": float(report.layers),
                   "batchnorm/batches": float(report.batches)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
    if label:
        rank_zero_info(f"{label}: BatchNorm statistics of {report.layers} layers re-estimated on {report.batches} "
                       f"training batches ({report.images} images per rank) in {report.seconds:.2f} s.")
    return report


def training_images(trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> Iterator[torch.Tensor]:
    """Images of up to ``count`` batches from a fresh pass over the fit's (first) training loader, through
    ``convert_input``, ``on_before_batch_transfer``, the device transfer and ``on_after_batch_transfer`` as in the
    training loop, so dict batches and user hooks work."""
    loader = _training_loader(trainer)
    for batch in itertools.islice(_fresh(loader), count):
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        yield split_batch(batch)[0]


def _training_loader(trainer: pl.Trainer):
    loaders = trainer.train_dataloader
    if loaders is None:
        trainer.fit_loop.setup_data()
        loaders = trainer.train_dataloader
    while isinstance(loaders, (Mapping, Sequence)) and not isinstance(loaders, DataLoader):
        if not loaders:
            break
        loaders = next(iter(loaders.values())) if isinstance(loaders, Mapping) else loaders[0]
    if loaders is None or isinstance(loaders, (Mapping, Sequence)):
        raise ValueError("bn_batches re-estimates BatchNorm statistics on training batches, but the fit has no "
                         "training dataloader; set bn_batches=0 to skip the re-estimation.")
    return loaders


def _clamped(trainer: pl.Trainer, count: int) -> int:
    """At most one epoch of batches (what ``limit_train_batches`` allows); an unknown length (an IterableDataset)
    takes the first ``count`` batches of a fresh pass."""
    per_epoch = trainer.num_training_batches
    if isinstance(per_epoch, (int, float)) and not math.isinf(per_epoch) and 0 < per_epoch < count:
        return int(per_epoch)
    return count


def _fresh(loader):
    """An iterable over ``loader`` that does not disturb the training loop's own pass: a loader with persistent
    workers would hand out (and reset) the very iterator the epoch is using, so it is copied without them."""
    if not isinstance(loader, DataLoader) or not (loader.persistent_workers and loader.num_workers > 0):
        return loader
    common = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  worker_init_fn=loader.worker_init_fn, persistent_workers=False)
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)
    return DataLoader(loader.dataset, sampler=loader.sampler, batch_size=None, **common)
