"""Export a segmentation net to an ExecuTorch ``.pte`` (XNNPACK delegate) and run it with the ExecuTorch runtime.

Pure torch + executorch: no Lightning import. ExecuTorch is an optional dependency
(``pip install 'lightning-segcompress[executorch]'``); it is imported lazily, so this module imports fine
without it. Use :func:`executorch_available` to check before calling the rest.

Flow (ExecuTorch >= 1.0)::

    torch.export.export(model, (example,))            # static shape of ``example``
    -> executorch.exir.to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])
    -> .to_executorch()  -> write ``.buffer`` to ``path``
    -> executorch.runtime.Runtime.get().load_program(path).load_method("forward").execute([x])
"""

from __future__ import annotations

import functools
import operator
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ExecuTorchProgram", "delegate_dtype", "executorch_available", "export_executorch"]

_INSTALL_HINT = "pip install 'lightning-segcompress[executorch]'"
_XNNPACK_BACKEND = "XnnpackBackend"


def executorch_available() -> tuple[bool, str]:
    """Whether ExecuTorch export *and* runtime (with the XNNPACK backend) are usable here.

    Returns ``(True, "")`` or ``(False, reason)``. Never raises.
    """
    try:
        import executorch  # noqa: F401
    except ImportError as err:
        return False, f"executorch is not installed: {_INSTALL_HINT} ({err})"
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        from executorch.exir import to_edge_transform_and_lower  # noqa: F401
        from executorch.runtime import Runtime
    except Exception as err:  # a broken install (e.g. built against another torch) fails here
        return False, f"executorch is installed but cannot be imported ({type(err).__name__}: {err})"
    try:
        runtime = Runtime.get()  # loads the native runtime library
        if not runtime.backend_registry.is_available(_XNNPACK_BACKEND):
            names = runtime.backend_registry.registered_backend_names
            return False, f"the executorch runtime has no {_XNNPACK_BACKEND} (registered: {names})"
    except Exception as err:
        return False, f"the executorch runtime cannot be loaded ({type(err).__name__}: {err})"
    return True, ""


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)


_CONVERSION_MARKERS = ("quantize_per_", "dequantize_per_", "choose_qparams")
_FUSED_ACTIVATIONS = ("relu", "hardtanh", "clamp")  # XNNPACK folds these into the int8 op before them


def _is_conversion(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(m in _op_name(node) for m in _CONVERSION_MARKERS)


def _is_dequantize(node: torch.fx.Node) -> bool:
    return _is_conversion(node) and "dequantize" in _op_name(node)


def _is_quantize(node: torch.fx.Node) -> bool:
    return _is_conversion(node) and "dequantize" not in _op_name(node) and "choose_qparams" not in _op_name(node)


def _is_compute(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is not operator.getitem and not _is_conversion(node)
            and "executorch_call_delegate" not in _op_name(node))


@functools.lru_cache(maxsize=1)
def _float_only_ops() -> frozenset[str]:
    """Ops (``hardswish.default``, ``upsample_bilinear2d.vec``, ...) whose XNNPACK partitioner config takes fp32
    only: XNNPACK computes them in float even between dequantize and quantize (with ``Convert`` ops around)."""
    try:
        from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
        from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    except ImportError:
        return frozenset()
    names = set()
    for config_class in ALL_PARTITIONER_CONFIGS:
        try:
            config = config_class()
            if ConfigPrecisionType.STATIC_QUANT not in config.supported_precision_types():
                names.add(config.target_name)
        except Exception:  # noqa: BLE001 - a config that cannot say is not counted either way
            continue
    return frozenset(names)


def _delegated_dtypes(graph: torch.fx.Graph) -> dict[torch.fx.Node, str]:
    """int8 / float of each compute op of a delegated (XNNPACK) graph: int8 where the op reads only dequantized
    tensors (parameters aside) and its result is only quantized again, directly or through one activation that
    XNNPACK fuses (the PT2E pattern dq -> op -> q that XNNPACK runs as one int8 op), unless XNNPACK runs that op
    in fp32 only (:func:`_float_only_ops`); float otherwise."""
    def reads_dequantized(node):
        inputs = [n for n in node.all_input_nodes if n.op == "call_function"]
        return bool(inputs) and all(_is_dequantize(n) for n in inputs)

    def quantized_after(node):
        return bool(node.users) and all(_is_quantize(u) for u in node.users)

    float_only = _float_only_ops()
    dtypes: dict[torch.fx.Node, str] = {}
    for node in graph.nodes:
        if not _is_compute(node) or node in dtypes:
            continue
        dtypes[node] = "float"
        if not reads_dequantized(node) or _op_name(node).rsplit("aten.", 1)[-1] in float_only:
            continue
        if quantized_after(node):
            dtypes[node] = "int8"
            continue
        users = list(node.users)
        if len(users) == 1 and any(a in _op_name(users[0]) for a in _FUSED_ACTIVATIONS) and \
                quantized_after(users[0]):
            dtypes[node] = dtypes[users[0]] = "int8"
    return dtypes


def _delegation_summary(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """Count what the partitioner delegated, from the lowered (edge) graph. ``getitem`` plumbing is not counted.

    Also the op composition: ``ops``, one entry per ``(op, delegated, dtype)`` with its ``count`` (compute ops only,
    quantize/dequantize conversions counted apart in ``conversions``), most frequent first. A delegated op is int8
    where XNNPACK runs it on int8 data (see :func:`_delegated_dtypes`); a non-delegated op runs on a portable kernel
    in float (an int8 model dequantizes before it). ``quantized`` says whether the graph has quantize/dequantize
    ops at all; in a quantized graph the float compute ops are its ``float_islands`` (same format as ``ops``)."""
    partitions = 0
    delegated = 0
    not_delegated: Counter[str] = Counter()
    composition: Counter[tuple[str, bool, str]] = Counter()
    conversions = 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith("lowered_module_"):
            partitions += 1
            lowered = getattr(graph_module, str(node.target))
            inner = lowered.original_module.graph
            delegated += sum(1 for n in inner.nodes if n.op == "call_function" and n.target is not operator.getitem)
            conversions += sum(1 for n in inner.nodes if _is_conversion(n))
            for n, dtype in _delegated_dtypes(inner).items():
                composition[(_op_name(n), True, dtype)] += 1
        elif node.op == "call_function" and node.target is not operator.getitem:
            name = _op_name(node)
            if "executorch_call_delegate" not in name:
                not_delegated[name] += 1
                if _is_conversion(node):
                    conversions += 1
                else:
                    composition[(name, False, "float")] += 1
    ops = [{"op": op, "delegated": is_delegated, "dtype": dtype, "count": count}
           for (op, is_delegated, dtype), count in sorted(composition.items(), key=lambda kv: (-kv[1], kv[0]))]
    quantized = conversions > 0
    return {
        "partitions": partitions,
        "delegated_nodes": delegated,
        "non_delegated_nodes": sum(not_delegated.values()),
        "non_delegated_ops": dict(sorted(not_delegated.items())),
        "ops": ops,
        "conversions": conversions,
        "quantized": quantized,
        "float_islands": [o for o in ops if o["dtype"] == "float"] if quantized else None,
    }


def delegate_dtype(ops: list[dict] | None) -> str | None:
    """The dtype of every delegated compute op in an export's ``ops`` where they all agree, else None."""
    dtypes = {o["dtype"] for o in ops or [] if o["delegated"]}
    return dtypes.pop() if len(dtypes) == 1 else None


def export_executorch(model: nn.Module, example: torch.Tensor, path: str | Path) -> dict[str, Any]:
    """Export ``model`` at the static shape of ``example``, lower it to XNNPACK and write a ``.pte`` to ``path``.

    ``model`` should be in eval mode and return a single tensor (wrap dict/tuple outputs before calling).
    Returns ``{"path", "size_bytes", "partitions", "delegated_nodes", "non_delegated_nodes", "non_delegated_ops",
    "ops", "conversions", "quantized", "float_islands"}`` where the counts describe how much of the graph went to
    XNNPACK (``getitem`` plumbing excluded) and ``ops`` is the op composition with each op's dtype (see
    :func:`_delegation_summary`).
    Raises on any failure (``ImportError`` when executorch is missing, export/lowering errors otherwise).
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as err:
        raise ImportError(f"executorch is not installed: {_INSTALL_HINT}") from err

    if model.training:
        raise ValueError("export_executorch expects an eval-mode model (call model.eval() first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example.detach().contiguous()

    with torch.no_grad():
        exported = torch.export.export(model, (example,))
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    try:
        info = _delegation_summary(edge.exported_program().graph_module)
    except Exception as err:  # statistics only: never fail an otherwise good export on them
        info = {"delegation_error": f"{type(err).__name__}: {err}"}
    program = edge.to_executorch()

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(program.buffer)
    os.replace(tmp, path)
    return {"path": str(path), "size_bytes": path.stat().st_size, **info}


class ExecuTorchProgram:
    """A ``.pte`` loaded with ``executorch.runtime``; call it like the eager model on a tensor of the exported shape.

    ``num_threads`` (optional) resizes ExecuTorch's *process-wide* CPU thread pool (used by XNNPACK); by default
    the runtime sizes it from the machine's core count.
    """

    def __init__(self, path: str | Path, method: str = "forward", *, num_threads: int | None = None) -> None:
        try:
            from executorch.runtime import Runtime
        except ImportError as err:
            raise ImportError(f"executorch is not installed: {_INSTALL_HINT}") from err
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ExecuTorch program at {self.path}")
        if num_threads is not None:
            from executorch.extension.pybindings import portable_lib

            if portable_lib._threadpool_get_thread_count() != num_threads:
                portable_lib._unsafe_reset_threadpool(int(num_threads))
        self._program = Runtime.get().load_program(self.path)
        if method not in self._program.method_names:
            raise KeyError(f"{self.path} has no method {method!r} (has {sorted(self._program.method_names)})")
        self._method = self._program.load_method(method)
        meta = self._method.metadata
        self.input_shape = tuple(meta.input_tensor_meta(0).sizes()) if meta.num_inputs() else ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shape and tuple(x.shape) != self.input_shape:
            raise ValueError(
                f"{self.path.name} was exported for input shape {self.input_shape}, got {tuple(x.shape)} "
                "(ExecuTorch programs here have static shapes; re-export for another shape)"
            )
        outputs = self._method.execute([x.detach().cpu().contiguous()])
        out = outputs[0]
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, input_shape={self.input_shape})"
