"""Activation buffers of a traced graph: size and lifetime of every intermediate tensor in execution order."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from lightning_segcompress.memory.trace import depends_on_input, module_path


@dataclass(frozen=True)
class Buffer:
    """One tensor allocation: alive from step ``first`` (its producer) to step ``last`` (its last reader)."""

    name: str
    size: int
    first: int
    last: int
    shape: tuple[int, ...] = ()
    module: str = ""

    def overlaps(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last


def activation_buffers(graph: fx.Graph, int8: bool = False) -> tuple[list[Buffer], list[fx.Node]]:
    """The buffers the graph allocates, and its steps (the input-dependent nodes in execution order).

    Weights and anything computed from weights alone are not activations. Views and in-place ops
    (``relu_``, ``add_``, slice assignment) reuse their input's buffer and extend its lifetime instead of
    allocating. The graph's outputs live to the last step. ``int8`` counts floating-point activations at one
    byte per element, as an int8-quantized network stores them.
    """
    dependent = depends_on_input(graph)
    steps = [node for node in graph.nodes if node in dependent]
    index = {node: i for i, node in enumerate(steps)}
    owned: dict[fx.Node, list[int]] = {}  # node -> indices into `allocations` whose memory its value uses
    allocations: list[dict] = []
    for node in steps:
        alias_of = _aliased_argument(node)
        if alias_of is not None:
            owned[node] = list(owned.get(alias_of, []))
            continue
        owned[node] = []
        for i, value in enumerate(tree_leaves(node.meta.get("val"))):
            if isinstance(value, torch.Tensor):
                size = value.numel() * (1 if int8 and value.is_floating_point() else value.element_size())
                owned[node].append(len(allocations))
                allocations.append({"name": node.name if i == 0 else f"{node.name}[{i}]", "size": size,
                                    "first": index[node], "last": index[node], "shape": tuple(value.shape),
                                    "module": module_path(node)})
    end = len(steps) - 1
    for node in graph.nodes:
        readers = [arg for arg in node.all_input_nodes if arg in owned]
        for arg in readers:
            for a in owned[arg]:
                step = end if node.op == "output" else index[node]
                allocations[a]["last"] = max(allocations[a]["last"], step)
    return [Buffer(**a) for a in allocations], steps


def _aliased_argument(node: fx.Node) -> fx.Node | None:
    """The input node whose memory ``node``'s output is (views, in-place ops, tuple items), or None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or len(schema.returns) != 1 or schema.returns[0].alias_info is None:
        return None
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def live_bytes(buffers: list[Buffer], steps: int) -> list[int]:
    """Bytes alive at every step (the lower bound of any plan is their maximum)."""
    live = [0] * (steps + 1)
    for b in buffers:
        live[b.first] += b.size
        live[b.last + 1] -= b.size
    total, out = 0, []
    for delta in live[:-1]:
        total += delta
        out.append(total)
    return out
