"""Sparsity penalties on BatchNorm scales (gamma), applied as L1 subgradients with per-channel strengths.

- ``slimming``: the same strength for every channel (Liu et al. 2017).
- ``acsl``: strength grows with how redundant a channel is with the others: ``lambda_c = s * r_c / mean(r)``,
  ``r_c = mean_{j != c} |cos(F_c, F_j)|`` over the BN layer's output maps (reconstruction of ACSL, REFERENCE §4).
- ``cap``: context-aware: with ``A = softmax(F F^T)`` (rows of F L2-normalised), the context a channel gives the
  others is ``k_c = mean_i A_ic``; channels giving less context are pushed harder:
  ``lambda_c = s * (1 / k_c) / mean(1 / k)`` (reconstruction after He et al. 2021, REFERENCE §4).
- ``budget``: MorphNet-style resource weighting: a layer's strength is ``s * cost / mean(cost)``, with cost the
  MACs (or params) one of its channels carries (reconstruction, REFERENCE §3).

Pure torch: the functions take BN modules and feature maps; the Lightning callback schedules them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_segcompress.utils.inspection import forward_with_hooks

METHODS = ("slimming", "acsl", "cap", "budget")


class SparsityError(ValueError):
    """The sparsity configuration cannot work for this network; the message says why and what to change."""


def batchnorm_layers(network: nn.Module, ignored: Iterable[str] = ()) -> dict[str, nn.BatchNorm2d]:
    """The affine BatchNorm2d layers of ``network`` (timm's BatchNormAct2d included) by name, minus ``ignored``."""
    ignored = set(ignored)
    layers = {name: m for name, m in network.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and name not in ignored}
    if not layers:
        raise SparsityError(f"{type(network).__name__} has no affine BatchNorm layers (or all are ignored): sparsity "
                            "learning penalises BN scales, so it needs BatchNorm after the convolutions.")
    return layers


def pooled_features(output: torch.Tensor, size: int = 16) -> torch.Tensor:
    """A BN output map, detached and average-pooled to at most ``size`` x ``size``: ``B x C x h x w``."""
    output = output.detach().float()
    if output.shape[-1] > size or output.shape[-2] > size:
        output = F.adaptive_avg_pool2d(output, (min(size, output.shape[-2]), min(size, output.shape[-1])))
    return output


def _normalised_rows(features: torch.Tensor) -> torch.Tensor:
    """``B x C x H x W`` -> ``B x C x HW`` with every channel's map of unit L2 norm."""
    return F.normalize(features.flatten(2), dim=2)


def redundancy(features: torch.Tensor) -> torch.Tensor:
    """ACSL: ``r_c = mean_{j != c} |cos(F_c, F_j)|`` per channel, averaged over the batch."""
    rows = _normalised_rows(features)
    cosine = (rows @ rows.transpose(1, 2)).abs().mean(0)  # C x C
    channels = cosine.shape[0]
    if channels < 2:
        return torch.ones(channels)
    return (cosine.sum(1) - cosine.diagonal()) / (channels - 1)


def context(features: torch.Tensor) -> torch.Tensor:
    """CAP: ``k_c = mean_i A_ic`` with ``A = softmax(F F^T)`` per image (rows of F unit-norm), batch mean."""
    rows = _normalised_rows(features)
    attention = torch.softmax(rows @ rows.transpose(1, 2), dim=-1)  # B x C x C, rows sum to 1
    return attention.mean(1).mean(0)


def strengths_from_features(method: str, base: float, features: torch.Tensor) -> torch.Tensor:
    """Per-channel strengths of one BN layer for ``acsl`` / ``cap`` from its (pooled) output maps; the mean
    strength of the layer is ``base``."""
    if method == "acsl":
        score = redundancy(features)
        return base * score / score.mean().clamp(min=1e-12)
    if method == "cap":
        weight = 1.0 / context(features).clamp(min=1e-12)
        return base * weight / weight.mean()
    raise SparsityError(f"method {method!r} does not use features.")


def budget_strengths(base: float, costs: Mapping[str, float], channels: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``budget``: ``s * cost / mean(cost)`` for every channel of each layer."""
    mean = sum(costs.values()) / max(len(costs), 1)
    return {name: torch.full((channels[name],), base * costs[name] / max(mean, 1e-12)) for name in costs}


def channel_costs(network: nn.Module, layers: Mapping[str, nn.Module], example: torch.Tensor,
                  resource: str = "macs") -> dict[str, float]:
    """What one output channel of the convolution feeding each BN layer costs: MACs (``k*k*in/groups*H*W``) or
    parameters (``k*k*in/groups``). A BN layer not fed directly by a convolution costs the mean of the others."""
    if resource not in ("macs", "params"):
        raise SparsityError(f"budget resource must be 'macs' or 'params', got {resource!r}.")
    producers: dict[int, tuple[nn.Conv2d, torch.Size]] = {}
    fed: dict[str, float] = {}

    def conv_hook(module, inputs, output):
        producers[id(output)] = (module, output.shape)

    def bn_hook(name):
        def hook(module, inputs, output):
            found = producers.get(id(inputs[0]))
            if found is not None:
                conv, shape = found
                per_channel = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
                fed[name] = float(per_channel * (shape[-1] * shape[-2] if resource == "macs" else 1))
        return hook

    handles = [m.register_forward_hook(conv_hook) for m in network.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(bn_hook(name)) for name, m in layers.items()]
    forward_with_hooks(network, example, handles)
    fallback = sum(fed.values()) / len(fed) if fed else 1.0
    return {name: fed.get(name, fallback) for name in layers}


def add_l1_subgradient(layers: Mapping[str, nn.Module], strengths: Mapping[str, torch.Tensor]) -> None:
    """``gamma.grad += strength * sign(gamma)`` for every layer with a gradient (network slimming's update)."""
    with torch.no_grad():
        for name, bn in layers.items():
            gamma = bn.weight
            if gamma.grad is None or name not in strengths:
                continue
            strength = strengths[name].to(device=gamma.device, dtype=gamma.dtype)
            if strength.shape != gamma.shape:
                raise SparsityError(f"strengths for {name!r} have {tuple(strength.shape)} entries but the layer has "
                                    f"{tuple(gamma.shape)} channels; recompute them after pruning.")
            gamma.grad.add_(strength * torch.sign(gamma))


def gamma_statistics(layers: Mapping[str, nn.Module], eps: float = 1e-2) -> dict[str, float]:
    """How sparse the BN scales are: the fraction with ``|gamma| < eps``, their mean and median magnitude."""
    values = torch.cat([bn.weight.detach().abs().flatten().float().cpu() for bn in layers.values()])
    return {"below_eps": float((values < eps).float().mean()), "mean_abs": float(values.mean()),
            "median_abs": float(values.median())}
