"""DDP plumbing the compression callbacks share: every rank takes rank 0's values, gradients of parameters
outside the DDP-wrapped module, and the re-wrap after the network's parameters changed."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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
    if not params or trainer.world_size < 2:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
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


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """DDP keeps buckets of the old parameters: wrap the module again so gradients of the new ones sync."""
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "_setup_model"):
        strategy.model = strategy._setup_model(strategy.lightning_module)
        if hasattr(strategy, "_register_ddp_hooks"):
            strategy._register_ddp_hooks()
