"""Model inspection shared by every technique: sizes, MACs, the network inside a wrapper, example inputs,
and the classifier layers that must never be pruned. Pure torch (a LightningModule is an ``nn.Module``)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from lightning_segcompress.utils.batch import split_batch

# Attribute names under which LightningModules commonly keep their network, in order of preference.
NETWORK_ATTRIBUTE_CANDIDATES = ("net", "network", "model", "segmenter", "backbone_model")


def extract_logits(output) -> torch.Tensor:
    """Return the main logits tensor of a segmentation network's output.

    Handles plain tensors, torchvision's ``{"out": ..., "aux": ...}`` dicts and tuples/lists whose first
    element is the main output.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "out" in output:
            return output["out"]
        raise TypeError(
            f"Segmentation output is a mapping with keys {sorted(output)} but no 'out' key; "
            "return a tensor or a dict with the logits under 'out'."
        )
    if isinstance(output, Sequence) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find logits in a network output of type {type(output).__name__}.")


def output_tensors(output) -> list[torch.Tensor]:
    """All tensors in a (possibly nested) network output, e.g. both 'out' and 'aux' heads."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [t for item in output for t in output_tensors(item)]
    return []


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters, including the packed weights (and biases) of int8 conv / linear modules."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if not trainable_only:
        for module in _quantized_weighted(model):
            bias = module.bias()
            total += module.weight().numel() + (bias.numel() if bias is not None else 0)
    return total


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, counted by torch-pruning (on a copy of the model); int8 conv
    and linear modules, which torch-pruning does not know, are counted from their weights and outputs, modules
    with an ``own_macs()`` method by it."""
    quantized = _quantized_weighted(model)
    counted: list[int] = []

    def hook(module, inputs, output):
        weight = module.weight()  # [out, in/groups, *kernel]: MACs per output element = in/groups * kernel
        counted.append(output.numel() // output.shape[1] * weight.numel() if output.dim() > 2
                       else output.shape[0] * weight.numel())

    if quantized:  # a forward of its own: torch-pruning's counting pass does not run these hooks
        handles = [m.register_forward_hook(hook) for m in quantized]
        try:
            with torch.no_grad():
                model(example_input)
        finally:
            for handle in handles:
                handle.remove()
    # Modules that run ops directly instead of through submodules (TiledInference) count themselves.
    counted += [m.own_macs() for m in model.modules() if hasattr(m, "own_macs")]
    macs, _ = tp.utils.count_ops_and_params(model, example_input)
    total = int(macs) + sum(counted)
    if total == 0 and any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):
        return _graph_macs(model, example_input)
    return total


def _graph_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs of a traced graph whose convolutions are graph ops, not modules (a PT2E int8 graph), from torch's FLOP
    counter (2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return counter.get_total_flops() // 2


def has_int8_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds torch.ao quantized (int8) modules, e.g. after FX ``convert``."""
    return any(_is_int8_module(m) for m in model.modules())


def _is_int8_module(module: nn.Module) -> bool:
    # fused int8 blocks (ConvReLU2d, LinearReLU) live in torch.ao.nn.intrinsic.quantized
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def _quantized_weighted(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_int8_module(m) and callable(getattr(m, "weight", None))]


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs}


def model_stats(model: nn.Module, example_input: torch.Tensor) -> ModelStats:
    return ModelStats(params=count_params(model), macs=count_macs(model, example_input))


def find_network(module: nn.Module, attribute: str | None = None) -> nn.Module:
    """Locate the segmentation network inside a LightningModule (or any wrapper module).

    Args:
        module: the wrapper, usually a LightningModule.
        attribute: dotted attribute path of the network (e.g. ``"model"`` or ``"model.net"``). When not
            given, the first of ``net``, ``network``, ``model``, ``segmenter`` that is an ``nn.Module``
            holding parameters is used; otherwise the single child module that holds parameters.

    Raises:
        AttributeError / ValueError: with the candidates found and how to name the right one.
    """
    if attribute:
        target: object = module
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise AttributeError(
                    f"{type(module).__name__} has no attribute path {attribute!r} (failed at {part!r}); "
                    f"its children are {[n for n, _ in module.named_children()]}."
                )
            target = getattr(target, part)
        if not isinstance(target, nn.Module):
            raise TypeError(f"{attribute!r} on {type(module).__name__} is a {type(target).__name__}, "
                            "not an nn.Module.")
        return target

    children = {name: child for name, child in module.named_children() if _has_parameters(child)}
    for name in NETWORK_ATTRIBUTE_CANDIDATES:
        if name in children:
            return children[name]
    if len(children) == 1:
        return next(iter(children.values()))
    if not children:
        raise ValueError(f"{type(module).__name__} has no child module with parameters to compress.")
    raise ValueError(
        f"Cannot tell which child of {type(module).__name__} is the network: {sorted(children)} all hold "
        "parameters. Pass the attribute name explicitly (e.g. network_attribute='model')."
    )


def _has_parameters(module: nn.Module) -> bool:
    if next(module.parameters(), None) is not None:
        return True
    return has_int8_modules(module)  # an int8 network keeps its weights packed, not as parameters


def input_channels(network: nn.Module) -> int:
    """Input channels of the first convolution in the network (3 for RGB segmentation nets); for a traced graph
    (e.g. PT2E, whose convolutions are graph ops, not modules) the channels of its 4-D input."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    graph = getattr(network, "graph", None)
    for node in getattr(graph, "nodes", ()):
        value = node.meta.get("val", node.meta.get("example_value")) if node.op == "placeholder" else None
        if getattr(value, "ndim", 0) == 4:
            return int(value.shape[1])
    raise ValueError(f"{type(network).__name__} has no nn.Conv2d; pass the input shape explicitly.")


def example_input(
    network: nn.Module,
    size: int | Sequence[int] = 64,
    batch_size: int = 1,
    channels: int | None = None,
    reference: object = None,
) -> torch.Tensor:
    """Build an example input on the network's device and dtype.

    ``reference`` may be a tensor, an ``(image, mask)`` batch or a ``{"image": ...}`` batch (e.g. a
    LightningModule's ``example_input_array`` or a batch from a dataloader): its image tensor is used
    (first ``batch_size`` items). Otherwise a random ``batch_size x C x H x W`` tensor is made, with C read
    from the first convolution.
    """
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if reference is not None:
        image = split_batch(reference)[0]
        return image[:batch_size].to(device=device, dtype=dtype)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    c = channels or input_channels(network)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, c, h, w, generator=generator).to(device=device, dtype=dtype)


_WEIGHTED_BACKWARD = ("ConvolutionBackward", "AddmmBackward", "MmBackward", "LinearBackward")


def find_classifier_layers(network: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the layers that produce the network's outputs (the final classifier convs).

    Walks the autograd graph backwards from every output tensor (so torchvision's ``aux`` head and
    LR-ASPP's two classifier branches are all found) and stops at the first weighted layer on each path.
    Pruning the output channels of these layers would change the number of classes.
    """
    param_owner = {id(p): name for name, m in network.named_modules() for p in m.parameters(recurse=False)}
    was_training = network.training
    frozen = [p for p in network.parameters() if not p.requires_grad]
    network.eval()
    try:
        for p in frozen:  # frozen weights leave no trace in the autograd graph
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs = output_tensors(network(example))
    finally:
        for p in frozen:
            p.requires_grad_(False)
        network.train(was_training)
    found: list[str] = []
    seen: set = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith(_WEIGHTED_BACKWARD):
            owner = _weight_owner(node, param_owner)
            if owner is not None:
                if owner not in found:
                    found.append(owner)
                continue
        stack.extend(next_fn for next_fn, _ in node.next_functions if next_fn is not None)
    if not found:
        raise ValueError(
            f"No weighted layer produces the outputs of {type(network).__name__}; does any parameter "
            "require grad? Name the classifier layers explicitly."
        )
    return found


def _weight_owner(node, param_owner: dict[int, str]) -> str | None:
    """Module name owning a parameter that feeds this backward node directly (or through a transpose)."""
    pending = [fn for fn, _ in node.next_functions if fn is not None]
    for _ in range(3):  # Linear weights reach addmm through a TBackward node
        following = []
        for fn in pending:
            variable = getattr(fn, "variable", None)
            if variable is not None and id(variable) in param_owner and variable.dim() > 1:
                return param_owner[id(variable)]
            if type(fn).__name__.startswith(("TBackward", "PermuteBackward", "ViewBackward")):
                following.extend(f for f, _ in fn.next_functions if f is not None)
        pending = following
    return None


def match_module_names(network: nn.Module, patterns: Iterable[str]) -> dict[str, list[str]]:
    """Map each pattern (an exact module name or a regex matched against the full name) to the module
    names it selects. Patterns that select nothing map to an empty list, so callers can report them."""
    names = [name for name, _ in network.named_modules() if name]
    result: dict[str, list[str]] = {}
    for pattern in patterns:
        if pattern in names:
            result[pattern] = [pattern]
            continue
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"Layer pattern {pattern!r} is neither a module name nor a valid regex: {err}") from err
        result[pattern] = [name for name in names if regex.fullmatch(name)]
    return result


def select_modules(network: nn.Module, patterns: Iterable[str], argument: str,
                   error: type[Exception] = ValueError) -> list[str]:
    """The module names ``patterns`` select (exact names, or regexes matched against the full name), without
    duplicates, in the order of the patterns. Patterns that select nothing raise one ``error`` that names them all,
    the argument they came from, and example names."""
    matches = match_module_names(network, patterns)
    unmatched = [pattern for pattern, names in matches.items() if not names]
    if unmatched:
        examples = [name for name, _ in network.named_modules() if name][:8]
        raise error(f"{argument} {unmatched} match no layer of {type(network).__name__}. Use module names (or "
                    f"regexes matching them in full), e.g. {examples}.")
    return list(dict.fromkeys(name for names in matches.values() for name in names))


@contextlib.contextmanager
def evaluation_mode(network: nn.Module) -> Iterator[nn.Module]:
    """Run ``network`` in eval mode without gradients inside the block; every submodule's train/eval mode is
    restored after (a wrapper in train mode around a network in eval mode stays that way)."""
    modes = [(module, module.training) for module in network.modules()]
    network.eval()
    try:
        with torch.no_grad():
            yield network
    finally:
        for module, mode in modes:
            module.training = mode


def module_device(network: nn.Module) -> torch.device:
    """Where ``network`` computes: its first parameter's (or buffer's) device; CPU for a module with neither (e.g.
    an int8 network whose weights are packed)."""
    tensor = next(itertools.chain(network.parameters(), network.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def copy_without_hooks(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` without the forward hooks attached to it (e.g. a distiller's captures), which
    ``copy.deepcopy`` would carry over."""
    hooks = {module: (module._forward_hooks, module._forward_pre_hooks) for module in network.modules()}
    try:
        for module in network.modules():
            module._forward_hooks, module._forward_pre_hooks = type(module._forward_hooks)(), \
                type(module._forward_pre_hooks)()
        return copy.deepcopy(network)
    finally:
        for module, (post, pre) in hooks.items():
            module._forward_hooks, module._forward_pre_hooks = post, pre


def frozen_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` without hooks, in eval mode, with no parameter requiring gradients."""
    copy = copy_without_hooks(network).eval()
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy


def forward_with_hooks(network: nn.Module, example: torch.Tensor, handles: list) -> object:
    """One eval-mode, no-gradient forward of ``network`` on ``example`` for the hooks behind ``handles``, which
    are removed afterwards (also when the forward fails). Returns the output."""
    try:
        with evaluation_mode(network):
            return network(example)
    finally:
        for handle in handles:
            handle.remove()


def has_submodule(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has a submodule at dotted path ``name``."""
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
