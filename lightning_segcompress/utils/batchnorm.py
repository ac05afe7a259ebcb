"""BatchNorm statistics after a structural change (pure torch).

Pruning, a spliced-in shunt or an undone step leave every BatchNorm layer with running statistics measured on
another network: the channels feeding it changed, so its mean and variance no longer describe what it sees, and
an eval-mode forward normalises with the wrong numbers (REFERENCE and issue 29: half of the immediate mIoU loss of
a one-shot 50 % prune is stale statistics). :func:`reestimate_batchnorm` measures them again on training images,
without gradients (after "precise BN", Wu & Johnson 2021): the layers run in train mode (each normalises with its
batch's statistics, as in training), and each layer's input is accumulated over all batches, so the new running
mean and (unbiased) variance are those of all the images seen, not an average of per-batch values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over DDP ranks (identity in one process)


@dataclass
class BatchNormReport:
    """What one re-estimation did: BN layers re-estimated, batches and images seen, wall seconds."""

    layers: int = 0
    batches: int = 0
    images: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class BatchNormError(RuntimeError):
    """BatchNorm statistics could not be re-estimated; the network was left exactly as before."""


def reestimated_layers(network: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers :func:`reestimate_batchnorm` updates: every one with running statistics, except those
    the user froze by putting them in eval mode inside a network in train mode. (In a network entirely in eval
    mode no layer can be told apart as frozen, and all are updated.)"""
    everything_eval = not network.training
    return {name: m for name, m in network.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
            and m.running_var is not None and (m.training or everything_eval)}


def reestimate_batchnorm(network: nn.Module, batches: Iterable[torch.Tensor], max_batches: int | None = None,
                         reduce: Reduce | None = None, forward: Callable[[torch.Tensor], object] | None = None
                         ) -> BatchNormReport:
    """Replace the running mean and variance of ``network``'s BatchNorm layers (see :func:`reestimated_layers`)
    by the statistics of their inputs over ``batches`` (image tensors, already on the network's device).

    No gradients are computed and nothing but the BN buffers changes: the re-estimated layers run in train mode
    for the passes, every other module keeps the mode it had (dropout as the user set it), and every mode is
    restored afterwards. New buffer tensors are assigned (the old ones are never written), so a shallow snapshot
    of the network taken before still restores the old statistics. A layer the batches never reach keeps its
    statistics. On any error the network is left exactly as before and :class:`BatchNormError` says why.

    Args:
        network: the network, in place.
        batches: image tensors ``N x C x H x W``; at most ``max_batches`` are used (None: all).
        max_batches: cap on the batches used; 0 re-estimates nothing.
        reduce: sums a tensor over processes (DDP: all-reduce); every process must call this function the same
            way, and then ends with identical statistics, those of all processes' images together.
        forward: how to run the network on a batch (default ``network(images)``), e.g. under autocast.
    """
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 (0 re-estimates nothing), got {max_batches}.")
    started = time.perf_counter()
    layers = reestimated_layers(network)
    if not layers or max_batches == 0:
        return BatchNormReport(seconds=time.perf_counter() - started)
    run = forward or network
    old = {name: (m.running_mean, m.running_var, m.num_batches_tracked) for name, m in layers.items()}
    modes = [(module, module.training) for module in network.modules()]
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in layers}  # count, sum, sum of squares (float64)
    handles = [m.register_forward_pre_hook(_accumulate(sums[name])) for name, m in layers.items()]
    report = BatchNormReport(layers=len(layers))
    try:
        for m in layers.values():  # train-mode passes update running stats in place: never in the old tensors
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
            if m.num_batches_tracked is not None:
                m.num_batches_tracked = m.num_batches_tracked.clone()
            m.training = True
        failure = None
        try:
            with torch.no_grad():
                for images in batches:
                    if max_batches is not None and report.batches >= max_batches:
                        break
                    run(images)
                    report.batches += 1
                    report.images += int(images.shape[0])
        except Exception as err:  # noqa: BLE001 - with reduce, every process must still join the collective
            if reduce is None:
                raise
            failure = err
        if report.batches == 0 and reduce is None:
            raise BatchNormError("no batch to re-estimate BatchNorm statistics on: the data gave none.")
        _set_statistics(layers, old, sums, reduce, failure)
    except Exception as err:
        for name, m in layers.items():
            m.running_mean, m.running_var, m.num_batches_tracked = old[name]
        if isinstance(err, BatchNormError):
            raise
        raise BatchNormError(f"re-estimating BatchNorm statistics failed and was rolled back: "
                             f"{type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    report.seconds = time.perf_counter() - started
    return report


def batchnorm_buffers(network: nn.Module) -> list[tuple[_BatchNorm, tuple]]:
    """The running-statistics tensors of every BatchNorm layer of ``network`` (references, no copies: the
    re-estimation assigns new tensors), for :func:`restore_batchnorm_buffers`."""
    return [(m, (m.running_mean, m.running_var, m.num_batches_tracked)) for m in network.modules()
            if isinstance(m, _BatchNorm)]


def restore_batchnorm_buffers(saved: list[tuple[_BatchNorm, tuple]]) -> None:
    for m, (mean, var, tracked) in saved:
        m.running_mean, m.running_var, m.num_batches_tracked = mean, var, tracked


def _accumulate(state: list):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        mean, var = mean.double(), var.double()
        state[0] += count
        state[1] = state[1] + count * mean
        state[2] = state[2] + count * (var + mean * mean)
    return hook


def _set_statistics(layers: dict[str, _BatchNorm], old: dict, sums: dict[str, list], reduce: Reduce | None,
                    failure: Exception | None = None) -> None:
    names = list(layers)
    if reduce is not None:  # one collective for all layers: [failed, then count, sums, squares per layer]
        parts = [torch.tensor([float(failure is not None)], dtype=torch.float64)]
        for name in names:
            channels = layers[name].running_mean.numel()
            count, total, squares = sums[name]
            parts += [torch.tensor([float(count)], dtype=torch.float64),
                      _as_vector(total, channels), _as_vector(squares, channels)]
        device = layers[names[0]].running_mean.device
        flat = reduce(torch.cat(parts).to(device)).cpu()
        if failure is not None:
            raise failure
        if flat[0] > 0:
            raise BatchNormError("re-estimating BatchNorm statistics failed on another process; see its error.")
        offset = 1
        for name in names:
            channels = layers[name].running_mean.numel()
            sums[name] = [float(flat[offset]), flat[offset + 1:offset + 1 + channels],
                          flat[offset + 1 + channels:offset + 1 + 2 * channels]]
            offset += 1 + 2 * channels
        if all(sums[name][0] == 0 for name in names):
            raise BatchNormError("no batch to re-estimate BatchNorm statistics on: the data gave none on any "
                                 "process.")
    for name, m in layers.items():
        count, total, squares = sums[name]
        if count < 2:  # never reached by the batches: keep what it had
            m.running_mean, m.running_var, m.num_batches_tracked = old[name]
            continue
        mean = total.to(torch.float64) / count
        var = (squares.to(torch.float64) - count * mean * mean).clamp_min(0) / (count - 1)  # unbiased, as BN keeps
        m.running_mean = mean.to(dtype=old[name][0].dtype, device=old[name][0].device)
        m.running_var = var.to(dtype=old[name][1].dtype, device=old[name][1].device)


def _as_vector(value, channels: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).reshape(-1)
    return torch.zeros(channels, dtype=torch.float64)
