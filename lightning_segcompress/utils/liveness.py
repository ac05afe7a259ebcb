"""How many networks does this process hold, and how much memory has it used? Pure torch (no Lightning).

Used by ``benchmarks/composition_footprint.py`` to count the copies of a network that compression callbacks keep
alive (teacher snapshots, benchmark references, pruning trials) next to the network being trained.
"""

from __future__ import annotations

import gc
import os
import resource

from torch import nn

__all__ = ["current_rss_mib", "live_networks", "peak_rss_mib"]


def live_networks(min_params: int = 1) -> list[nn.Module]:
    """The networks alive in this process: root ``nn.Module`` instances holding at least ``min_params``
    parameter and buffer elements (``numel``) in total.

    - ``gc.collect()`` runs first, so modules kept only by an unreachable reference cycle are not counted.
    - A root is a module that is no direct child (``_modules`` entry) of any other live module: a whole network
      counts once, not once per layer, and a LightningModule holding the network counts as that network.
    - A root whose set of parameter and buffer storages (``data_ptr`` of each non-empty tensor) is a subset of
      another root's counts as that other root: e.g. a GraphModule traced from the network, or a wrapper around
      it kept outside the LightningModule, shares its tensors and is no copy in memory. Of two roots with the
      same set, the first found is kept. Roots on the meta device (no storage) are kept as they are.

    Modules are found with ``gc.get_objects()``, i.e. only those the garbage collector tracks (every ordinary
    ``nn.Module`` instance is). The scan costs a fraction of a second per million live Python objects.
    """
    gc.collect()
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]
    children = {id(child) for module in modules for child in module._modules.values() if child is not None}
    roots = []
    for module in modules:
        if id(module) in children:
            continue
        tensors = [*module.parameters(), *module.buffers()]
        if sum(t.numel() for t in tensors) >= min_params:
            storages = frozenset(t.data_ptr() for t in tensors if t.numel() and t.device.type != "meta")
            roots.append((module, storages))
    del modules
    kept = []
    for index, (module, storages) in enumerate(roots):
        if storages and any(storages < other or (storages == other and j < index)
                            for j, (_, other) in enumerate(roots) if j != index):
            continue
        kept.append(module)
    return kept


def peak_rss_mib() -> float:
    """The most resident memory this process has used so far (``ru_maxrss``; KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """The resident memory of this process now (``/proc/self/statm``, Linux), in MiB."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
