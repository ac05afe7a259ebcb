"""Plumbing every compression callback shares: output folders, optimizer/scheduler rebuild after surgery,
DDP re-wrap, and carrying the compression state through checkpoints."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_segcompress.compression_state import restore_from_checkpoint
from lightning_segcompress.models.segmentation_module import split_batch
from lightning_segcompress.utils.inspection import evaluation_mode, extract_logits, module_device
from lightning_segcompress.utils.metrics import miou_evaluator


def checked_input_size(input_size, default: list[int] | None = (64, 64)) -> list[int] | None:
    """The ``[H, W]`` a callback builds its example input with (``default`` when not given); refuses anything
    else at construction."""
    if input_size is None:
        return None if default is None else list(default)
    if len(input_size) != 2:
        raise ValueError(f"input_size is [H, W], got {input_size}.")
    return list(input_size)


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


def broadcast_from_rank_zero(tensors) -> None:
    """Overwrite ``tensors`` on every DDP rank with rank 0's values (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(trainer: pl.Trainer, params: list) -> None:
    """Average the gradients of ``params`` across DDP ranks by hand: for parameters a callback trains outside
    the DDP-wrapped module (distillation connectors, a shunt in training)."""
    if not params or trainer.world_size < 2 or not dist.is_available() or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= trainer.world_size
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def set_ddp_gradient_sync(trainer: pl.Trainer, enabled: bool) -> None:
    """Switch DDP's gradient reduction off while the wrapped module's parameters get no gradients (otherwise DDP
    waits for them and fails at the next forward) and on again; what ``DistributedDataParallel.no_sync`` does,
    for longer than one step."""
    model = trainer.strategy.model
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled


def validation_batches(trainer: pl.Trainer, count: int | None) -> list:
    """Up to ``count`` (all if None) batches of the fit's validation data, on the module's device; [] if the
    fit has none."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    loop.setup_data()
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    batches = []
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        for batch in loader:
            if count is not None and len(batches) >= count:
                return batches
            batches.append(trainer.lightning_module._apply_batch_transfer_handler(batch))
    return batches


def validation_miou(trainer: pl.Trainer, network: torch.nn.Module, count: int | None,
                    ignore_index: int = 255) -> tuple[Callable[[torch.nn.Module], float] | None, int]:
    """A function scoring a network's mIoU on up to ``count`` labelled batches of the fit's validation data (the
    same batches at every call), and how many batches it uses; ``(None, 0)`` without labelled batches."""
    batches = labelled_validation_batches(trainer, count)
    if not batches:
        return None, 0
    with evaluation_mode(network):
        classes = extract_logits(network(batches[0][0][:1].to(module_device(network)))).shape[1]
    return miou_evaluator(batches, classes, ignore_index), len(batches)


def labelled_validation_batches(trainer: pl.Trainer, count: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, masks)`` of up to ``count`` validation batches that have labels."""
    batches = [split_batch(b) for b in validation_batches(trainer, count)]
    return [(images, masks) for images, masks in batches if masks is not None]


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


def install_extra_parameters(pl_module: pl.LightningModule, key: str, parameters: Callable[[], list]) -> None:
    """Train parameters that a callback owns (e.g. distillation connectors) with the module's optimizer.

    ``configure_optimizers`` is wrapped on this instance: the parameters returned by ``parameters()`` at that
    moment are added as a param group of the first optimizer with the settings and LR schedule of its first
    group, unless they are in it already. Works for every return form of ``configure_optimizers`` and again whenever the
    optimizers are rebuilt after surgery.
    """
    registry = pl_module.__dict__.setdefault("_segcompress_extra_parameters", {})
    registry[key] = parameters
    if "configure_optimizers" in pl_module.__dict__:
        return
    original = pl_module.configure_optimizers

    def configure_optimizers():
        config = original()
        optimizers = list({id(o): o for o in _optimizers_in(config)}.values())
        if not optimizers:
            raise ValueError(f"{type(pl_module).__name__}.configure_optimizers returned no optimizer, but callbacks "
                             f"{sorted(registry)} have parameters to train.")
        present = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        extra = [p for get in registry.values() for p in get() if id(p) not in present]
        if extra:
            _add_group_like_first(optimizers[0], list({id(p): p for p in extra}.values()), _schedulers_in(config))
        return config

    pl_module.configure_optimizers = configure_optimizers


def _add_group_like_first(optimizer: Optimizer, params: list, schedulers: list) -> None:
    """Add ``params`` as a group that copies the first group's settings and follows its LR schedule."""
    first = optimizer.param_groups[0]
    groups_before = len(optimizer.param_groups)
    optimizer.add_param_group({**{k: v for k, v in first.items() if k != "params"}, "params": params})
    for scheduler in schedulers:
        if scheduler.optimizer is not optimizer:
            continue
        # per-group lists (base_lrs, _last_lr, lr_lambdas, max_lrs, ...) get the first group's entry again,
        # otherwise the scheduler's next step fails on the extra group
        for value in vars(scheduler).values():
            if isinstance(value, list) and len(value) == groups_before:
                value.append(copy.copy(value[0]))


def _schedulers_in(config) -> list:
    if isinstance(config, LRScheduler) or hasattr(config, "optimizer") and hasattr(config, "step"):
        return [config]
    if isinstance(config, Mapping):
        return _schedulers_in(config.get("lr_scheduler")) + _schedulers_in(config.get("scheduler"))
    if isinstance(config, (list, tuple)):
        return [s for item in config for s in _schedulers_in(item)]
    return []


def remove_extra_parameters(pl_module: pl.LightningModule, key: str) -> None:
    registry = pl_module.__dict__.get("_segcompress_extra_parameters", {})
    registry.pop(key, None)
    if not registry:
        pl_module.__dict__.pop("_segcompress_extra_parameters", None)
        pl_module.__dict__.pop("configure_optimizers", None)


def _optimizers_in(config) -> list[Optimizer]:
    if isinstance(config, Optimizer):
        return [config]
    if isinstance(config, Mapping):
        return _optimizers_in(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        return [o for item in config for o in _optimizers_in(item)]
    return []


def announce_compression(trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> None:
    """Tell the other callbacks that the network's architecture is about to change (``moment="before"``) or
    just changed (``"after"``, before the optimizers are rebuilt): e.g. distillation snapshots its teacher
    before the first pruning step and resizes its connectors after each."""
    for callback in trainer.callbacks:
        hook = getattr(callback, f"on_{moment}_compression", None)
        if callable(hook):
            hook(trainer, pl_module)
