"""Dependency graphs (torch-pruning), atomic replay of a pruning history, and width metrics.

A *history* is torch-pruning's record of a pruning run as plain data: ``[[root_module_name, is_out_channels,
[channel indices]], ...]``. Replaying it on a fresh copy of the same architecture reproduces the pruned
shapes exactly, which is how checkpoints restore without pickling modules and how DDP ranks stay identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from lightning_segcompress.utils.inspection import count_macs, count_params, output_tensors
from lightning_segcompress.utils.precision import autocast_disabled
from lightning_segcompress.utils.rollback import restore, snapshot

History = list[list]  # [[module_name: str, is_out_channels: bool, indices: list[int]], ...]
METRICS = ("macs", "params", "channels")


class PruningError(RuntimeError):
    """A pruning step could not be planned or applied; the network was left exactly as before."""


def build_graph(network: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``network`` on ``example`` into torch-pruning's dependency graph (train/eval mode preserved).

    torch-pruning traces the autograd graph, in which frozen layers do not appear; they are unfrozen for the
    trace only, so a frozen encoder still gets its channels cut consistently with its trainable neighbours.
    """
    was_training = network.training
    frozen = [p for p in network.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad(), autocast_disabled([example.device]):  # traced on the example's device, no casts
            return tp.DependencyGraph().build_dependency(
                network, example_inputs=example, output_transform=output_tensors, verbose=False
            )
    except Exception as err:
        raise PruningError(
            f"torch-pruning could not trace {type(network).__name__}: {type(err).__name__}: {err}. "
            "The network's forward must run on a single image tensor; name untraceable parts in ignored_layers."
        ) from err
    finally:
        network.train(was_training)
        for p in frozen:
            p.requires_grad_(False)


def unsupported_layers(network: nn.Module) -> dict[str, str]:
    """Modules that hold parameters of their own but have no torch-pruning pruner: name -> class name.

    torch-pruning would guess how to cut such parameters; we refuse instead unless the user ignores them.
    """
    registered = tp.DependencyGraph().REGISTERED_PRUNERS
    found = {}
    for name, module in network.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        op_type = tp.ops.module2type(module)
        if op_type not in registered or op_type == tp.ops.OPTYPE.ELEMENTWISE:
            found[name] = type(module).__name__
    return found


def unused_layers(network: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Top-level layers holding parameters that ``network``'s forward never runs (e.g. the deeper stages of
    an smp encoder built with ``encoder_depth=3``): name -> parameter count. They count towards ``params``
    but no pruning can reach them."""
    ran: set[nn.Module] = set()
    handles = [m.register_forward_hook(lambda m, a, o: ran.add(m)) for m in network.modules()]
    try:
        with torch.no_grad():
            _eval_forward(network, example)
    finally:
        for handle in handles:
            handle.remove()
    idle = {m for m in network.modules() if m not in ran and next(m.parameters(recurse=False), None) is not None}
    unused: dict[str, int] = {}
    for name, module in network.named_modules():  # the outermost modules whose weighted layers all stayed idle
        holders = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
        if not holders or not all(m in idle for m in holders) or any(name.startswith(u + ".") for u in unused):
            continue
        unused[name] = sum(p.numel() for p in module.parameters())
    return unused


def normalise_history(history: Iterable[Sequence]) -> History:
    """History entries as JSON-able plain data (names, bools, ints)."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def replay_history(network: nn.Module, history: History, example: torch.Tensor) -> None:
    """Apply ``history`` to ``network`` in place, atomically.

    After the replay the network must still run on ``example`` with the same output shapes; if tracing,
    pruning or that check fails, every module is put back exactly as it was and ``PruningError`` names the
    module that failed.
    """
    if not history:
        return
    before = snapshot(network)
    requires_grad = {name: p.requires_grad for name, p in network.named_parameters()}
    try:
        with torch.no_grad():
            expected = [t.shape for t in output_tensors(_eval_forward(network, example))]
        graph = build_graph(network, example)
        for name, is_out, idxs in history:
            module = _submodule(network, name)
            handler = graph.get_pruner_of_module(module)
            if handler is None:
                raise PruningError(f"layer {name!r} ({type(module).__name__}) has no torch-pruning pruner")
            fn = handler.prune_out_channels if is_out else handler.prune_in_channels
            graph.get_pruning_group(module, fn, list(idxs)).prune(record_history=False)
        for name, p in network.named_parameters():  # pruned parameters come back with requires_grad=True
            p.requires_grad_(requires_grad.get(name, True))
        _check_forward(network, example, expected)
    except Exception as err:
        restore(network, before)
        if isinstance(err, PruningError):
            raise
        raise PruningError(f"pruning failed and was rolled back: {type(err).__name__}: {err}") from err


def _eval_forward(network: nn.Module, example: torch.Tensor):
    was_training = network.training
    network.eval()
    try:
        return network(example)
    finally:
        network.train(was_training)


def _check_forward(network: nn.Module, example: torch.Tensor, expected: list[torch.Size]) -> None:
    stack: list[str] = []  # names of the modules whose forward is running, innermost last

    def enter(name):
        return lambda module, args: stack.append(name)

    def leave(module, args, output):
        stack.pop()

    handles = []
    for name, module in network.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            shapes = [t.shape for t in output_tensors(_eval_forward(network, example))]
    except Exception as err:
        culprit = stack[-1] if stack else "<root>"
        module = network.get_submodule(culprit) if culprit != "<root>" else network
        raise PruningError(
            f"after pruning, layer {culprit!r} ({type(module).__name__}) fails: {type(err).__name__}: "
            f"{str(err)[:300]}. torch-pruning cannot keep this layer consistent with its neighbours; add "
            f"{culprit!r} (or the layers feeding it) to ignored_layers. The network was restored unchanged."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    if shapes != expected:
        raise PruningError(f"pruning changed the output shapes from {expected} to {shapes}; a classifier layer "
                           "was pruned. Add it to ignored_layers. The network was restored unchanged.")


def _submodule(network: nn.Module, name: str) -> nn.Module:
    try:
        return network.get_submodule(name)
    except AttributeError as err:
        raise PruningError(f"the pruning history names layer {name!r}, which {type(network).__name__} does not "
                           "have: the checkpoint was made with a different architecture.") from err


def layer_widths(network: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer: the "channels kept per layer" report."""
    widths = {}
    for name, module in network.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            widths[name] = int(module.out_features)
    return widths


def measure(network: nn.Module, example: torch.Tensor, metrics: Sequence[str] = METRICS) -> dict[str, int]:
    values = {}
    if "macs" in metrics:
        values["macs"] = count_macs(network, example)
    if "params" in metrics:
        values["params"] = count_params(network)
    if "channels" in metrics:
        values["channels"] = sum(layer_widths(network).values())
    return values
