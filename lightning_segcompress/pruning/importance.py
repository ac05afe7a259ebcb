"""Channel importance: named criteria mapped onto torch-pruning's estimators, and a score cache so that a
whole target search (and every DDP rank) ranks channels by the same numbers."""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

IMPORTANCE_NAMES = ("l1", "l2", "bn_scale", "taylor", "random")


def build_importance(name: str, **kwargs) -> tp.importance.Importance:
    """``l1``/``l2`` (weight magnitude), ``bn_scale`` (|gamma| of the BatchNorm after each conv),
    ``taylor`` (|w * dL/dw|, needs gradients), ``random``, or ``"package.module.Class"`` of a
    ``torch_pruning.importance.Importance`` (instantiated with ``kwargs``)."""
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1, **kwargs)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2, **kwargs)
    if name == "bn_scale":
        return BNScaleImportance(**kwargs)
    if name == "taylor":
        return tp.importance.TaylorImportance(**kwargs)
    if name == "random":
        return tp.importance.RandomImportance()
    cls = resolve_importance_class(name)
    return cls(**kwargs)


class BNScaleImportance(tp.importance.BNScaleImportance):
    """Network-slimming importance (|gamma| of BatchNorm), averaged per channel over the group's BN layers.

    torch-pruning 1.6.1's version sizes its result by the first BN it meets, which breaks on groups that run
    through a concat (smp's ASPP/decoder): that BN covers only a slice of the root's channels.
    """

    def __call__(self, group, **kwargs):
        self._root_channels = len(group[0].idxs)
        return super().__call__(group, **kwargs)

    def _reduce(self, group_imp, group_idxs):
        total = torch.zeros(self._root_channels)
        count = torch.zeros(self._root_channels)
        for imp, root_idxs in zip(group_imp, group_idxs):
            if any(r is None for r in root_idxs):
                continue
            index = torch.as_tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, index, imp.detach().float().cpu())
            count.scatter_add_(0, index, torch.ones(len(index)))
        return total / count.clamp(min=1) if self.group_reduction == "mean" else total


def resolve_importance_class(name: str) -> type:
    if "." not in name:
        raise ValueError(f"Unknown importance {name!r}: use one of {list(IMPORTANCE_NAMES)} or the class path "
                         "of a torch_pruning.importance.Importance subclass, e.g. 'my_pkg.scores.MyImportance'.")
    module_name, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import importance class {name!r}: {err}") from err
    if not callable(cls):
        raise ValueError(f"Importance {name!r} is not a class or callable.")
    return cls


ROOT_TYPES = [nn.modules.conv._ConvNd, nn.Linear]  # the layers a channel group starts from


def is_out_pruning(dep) -> bool:
    """Whether a dependency cuts its layer's output channels (else its input channels)."""
    return dep.handler.__name__.startswith("prune_out")


def group_key(group, module_names: dict[nn.Module, str]) -> str:
    """A name for a pruning group that is the same in every copy of the network: root layer and direction."""
    dep = group[0].dep
    direction = "out" if is_out_pruning(dep) else "in"
    return f"{module_names[dep.target.module]}:{direction}"


def group_layers(group, module_names: dict[nn.Module, str]) -> set[str]:
    """Names of the layers a group cuts; a bare parameter (torch-pruning's "unwrapped" ones) counts as its
    owner's."""
    return {module_names[dep.target.module] for dep, _ in group if dep.target.module in module_names}


def owner_names(network: nn.Module) -> dict:
    """``{module or parameter: name of the module that holds it}`` for everything a group can target."""
    names = {}
    for name, module in network.named_modules():
        names[module] = name
        for param in module.parameters(recurse=False):
            names.setdefault(param, name)
    return names


def compute_group_scores(
    graph: tp.DependencyGraph,
    importance: Callable,
    ignored_modules: Iterable[nn.Module],
    protected_layers: set[str],
    weights: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Score every prunable group of ``graph`` once: ``{group_key: per-channel scores}``.

    Groups that touch a ``protected`` layer (a layer torch-pruning cannot cut) are left out, so they are never
    pruned. ``weights`` multiplies a group's scores, e.g. to make channels of slow layers cheaper to remove.
    """
    names = owner_names(graph.model)
    scores = {}
    for group in graph.get_all_groups(ignored_layers=list(ignored_modules),
                                      root_module_types=ROOT_TYPES):
        if group_layers(group, names) & protected_layers:
            continue
        imp = importance(group)
        if imp is None:
            continue
        key = group_key(group, names)
        imp = imp.detach().double().cpu()
        if weights and key in weights:
            imp = imp * float(weights[key])
        scores[key] = _break_ties(imp, key).tolist()
    return scores


def _break_ties(imp: torch.Tensor, key: str) -> torch.Tensor:
    """Add a tiny deterministic jitter (seeded by the group's name, the same on every rank and run).

    torch-pruning thresholds globally with ``score <= threshold``: with equal scores (e.g. BatchNorm gammas
    that are all 1 at initialisation) it would select every channel of every group at once."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    scale = float(imp.abs().mean()) * 1e-6 + 1e-12
    return imp + scale * torch.rand(len(imp), generator=generator, dtype=torch.float64)


class CachedImportance(tp.importance.Importance):
    """Returns precomputed scores by group key; groups without a score are never pruned."""

    def __init__(self, scores: dict[str, list[float]], network: nn.Module):
        self.scores = scores
        self.names = {m: n for n, m in network.named_modules()}

    def __call__(self, group, **kwargs):
        values = self.scores.get(group_key(group, self.names))
        if values is None or len(values) != len(group[0].idxs):
            return None
        return torch.tensor(values, dtype=torch.float64)
