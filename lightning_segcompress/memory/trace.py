"""Trace a network into an ATen graph with static shapes (torch.export), the form both the memory planner and
tiled inference work on."""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from lightning_segcompress.utils.inspection import evaluation_mode


class TracingError(RuntimeError):
    """The network cannot be captured as one graph (data-dependent control flow, unsupported Python)."""


def export_graph(network: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` the network in eval mode for ``example``'s shape; returns the callable graph module.

    The graph keeps in-place ops (``relu_``) and views as PyTorch runs them; every node carries its output's
    shape and dtype in ``node.meta["val"]`` and the module it came from in ``node.meta["nn_module_stack"]``.
    """
    try:
        with evaluation_mode(network), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(network, (example,), strict=False)
    except Exception as err:
        raise TracingError(
            f"Cannot trace {type(network).__name__} with torch.export for input {list(example.shape)}: "
            f"{type(err).__name__}: {_first_line(err)}. The memory planner and tiled inference need a forward "
            "without data-dependent Python control flow; make the branch depend on shapes only, or plan the "
            "traceable part (e.g. the encoder) on its own."
        ) from err
    if len(program.graph_signature.user_inputs) != 1:
        raise TracingError(f"Expected a network with one image input, got {program.graph_signature.user_inputs}.")
    return program.module(check_guards=False)  # callers check the input shape themselves


def module_path(node: fx.Node) -> str:
    """Name of the innermost module that produced ``node`` ('' for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def module_paths(node: fx.Node) -> list[str]:
    """Every module that ``node`` was produced inside, outermost first."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def depends_on_input(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from the image input (the rest are weights and constants)."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            if node.op != "output":
                dependent.add(node)
    return dependent


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
