"""What compression callbacks change in the user's training, on the module instance only: optimizers and LR
schedulers rebuilt after surgery, extra parameters (connectors) in the first optimizer, and loss terms."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


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


def _optimizers_in(config) -> list[Optimizer]:
    if isinstance(config, Optimizer):
        return [config]
    if isinstance(config, Mapping):
        return _optimizers_in(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        return [o for item in config for o in _optimizers_in(item)]
    return []


def remove_extra_parameters(pl_module: pl.LightningModule, key: str) -> None:
    _unregister(pl_module, "_segcompress_extra_parameters", key, "configure_optimizers")


def _unregister(pl_module: pl.LightningModule, registry: str, key: str, wrapped: str) -> None:
    """Drop ``key`` from an instance registry; the wrapper of method ``wrapped`` goes with its last entry."""
    entries = pl_module.__dict__.get(registry, {})
    entries.pop(key, None)
    if not entries:
        pl_module.__dict__.pop(registry, None)
        pl_module.__dict__.pop(wrapped, None)


LossTerm = Callable[[torch.Tensor, Any, pl.LightningModule], torch.Tensor]


def install_loss_term(pl_module: pl.LightningModule, key: str, term: LossTerm, first: bool = False) -> None:
    """Change the loss that ``training_step`` returns: ``term(loss, batch, pl_module)`` gives the new loss.

    ``training_step`` is wrapped once on this instance, whatever the number of callbacks: the terms run in the
    order they were installed, those installed with ``first=True`` (a term that replaces the loss) before the
    others, so the result does not depend on the callbacks' order. The step may return a tensor or a dict with
    ``"loss"`` (the dict's other entries are kept).
    """
    registry = pl_module.__dict__.setdefault("_segcompress_loss_terms", {})
    registry[key] = (first, term)
    if "training_step" in pl_module.__dict__:
        return
    original = pl_module.training_step

    def training_step(*args, **kwargs):
        output = original(*args, **kwargs)
        if output is None:
            return output
        batch = args[0] if args else kwargs.get("batch")
        if isinstance(output, torch.Tensor):
            loss = output
        elif isinstance(output, Mapping) and "loss" in output:
            loss = output["loss"]
        else:
            raise TypeError(f"{type(pl_module).__name__}.training_step returned {type(output).__name__}; "
                            f"{sorted(registry)} need a loss tensor or a dict with 'loss'.")
        for _, term in sorted(registry.values(), key=lambda entry: not entry[0]):
            loss = term(loss, batch, pl_module)
        return {**output, "loss": loss} if isinstance(output, Mapping) else loss

    pl_module.training_step = training_step


def remove_loss_term(pl_module: pl.LightningModule, key: str) -> None:
    _unregister(pl_module, "_segcompress_loss_terms", key, "training_step")


def lr_schedule_state(trainer: pl.Trainer) -> dict:
    """Where the LR schedules are now: every scheduler's state and every optimizer group's learning rate."""
    return {"schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
            "lrs": [[group["lr"] for group in o.param_groups] for o in trainer.optimizers]}


def load_lr_schedule_state(trainer: pl.Trainer, state: dict) -> None:
    """Put the LR schedules back to ``state`` (from :func:`lr_schedule_state`): the schedulers continue from that
    position and the optimizers use its learning rates. Param groups added since (e.g. distillation connectors)
    follow the first group, as when they were added."""
    for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
        config.scheduler.load_state_dict(copy.deepcopy(saved))
        groups = len(config.scheduler.optimizer.param_groups)
        for value in vars(config.scheduler).values():
            if isinstance(value, list) and value and len(value) < groups:
                value.extend(copy.copy(value[0]) for _ in range(groups - len(value)))
    for optimizer, lrs in zip(trainer.optimizers, state["lrs"]):
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = lrs[index] if index < len(lrs) else lrs[0]
