"""The one registry of runtimes a network is exported to, loaded in, timed and profiled on.

The benchmark (:mod:`~lightning_segcompress.benchmark.runner` and its worker), the export bundle, ``segcompress
export`` / ``benchmark`` and the latency model of ``StructuredPruning(target="latency")`` all look runtimes up here;
a new runtime is one :class:`Runtime` passed to :func:`register_runtime`. Every adapter imports its runtime lazily.

    from lightning_segcompress.benchmark.runtimes import get_runtime
    runtime = get_runtime("onnx")                     # aliases resolve: runtime.name == "onnxruntime"
    info = runtime.export(model, example, "model.onnx")
    program = runtime.load(info["path"], threads=2)   # program(x) -> logits tensor
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["Runtime", "canonical_name", "export_and_load", "file_runtimes", "get_runtime", "is_runtime",
           "register_runtime", "runtime_for_file", "runtime_names"]


def _always() -> tuple[bool, str]:
    return True, ""


def _never(model: nn.Module) -> str | None:
    return None


@dataclass(frozen=True)
class Runtime:
    """One runtime. ``suffix``: its file's (None: it runs the module itself, no file). ``available()``: ``(ok,
    reason)``, never raises. ``refuses(model)``: why this runtime cannot take ``model`` (None: it can).
    ``export(model, example, path, **options)`` -> ``{"path", "size_bytes", ...}``; ``load(path, threads)`` ->
    a callable ``tensor -> tensor``; ``profile(program, path, x, quantized=, delegate_dtype=, threads=)`` -> a
    profile dict (:mod:`~lightning_segcompress.benchmark.profile`). ``export_options``: the keyword options its
    ``export`` accepts (e.g. ``dynamic``). ``extra``: the pip extra that installs it."""

    name: str
    label: str
    suffix: str | None
    available: Callable[[], tuple[bool, str]] = _always
    refuses: Callable[[nn.Module], str | None] = _never
    export: Callable[..., dict] | None = None
    load: Callable[..., Callable] | None = None
    profile: Callable[..., dict] | None = None
    extra: str | None = None
    aliases: tuple[str, ...] = ()
    export_options: tuple[str, ...] = field(default=())

    @property
    def artifact(self) -> str:
        """The file name the benchmark exports to (``model.pte`` ...)."""
        if self.suffix is None:
            raise ValueError(f"runtime {self.name!r} writes no file")
        return f"model{self.suffix}"

    @property
    def install_hint(self) -> str:
        return f"pip install 'lightning-segcompress[{self.extra}]'" if self.extra else ""


_REGISTRY: dict[str, Runtime] = {}
_ALIASES: dict[str, str] = {}


def register_runtime(runtime: Runtime, *, replace: bool = False) -> Runtime:
    """Add ``runtime`` to the registry (``replace`` an existing one of the same name)."""
    taken = [n for n in (runtime.name, *runtime.aliases) if n in _ALIASES and _ALIASES[n] != runtime.name]
    if taken or (runtime.name in _REGISTRY and not replace):
        raise ValueError(f"runtime name(s) {taken or [runtime.name]} are already registered; pass replace=True to "
                         "replace a runtime of the same name.")
    _REGISTRY[runtime.name] = runtime
    for name in (runtime.name, *runtime.aliases):
        _ALIASES[name] = runtime.name
    return runtime


def get_runtime(name: str) -> Runtime:
    """The registered runtime called ``name`` (or one of its aliases); a ValueError lists the choices."""
    if name not in _ALIASES:
        raise ValueError(f"Unknown runtime {name!r}; choose one of {list(runtime_names())}.")
    return _REGISTRY[_ALIASES[name]]


def canonical_name(name: str) -> str:
    return get_runtime(name).name


def is_runtime(name: str) -> bool:
    """Whether ``name`` is a registered runtime or one of their aliases."""
    return name in _ALIASES


def runtime_names() -> tuple[str, ...]:
    """Registered runtimes, in registration order."""
    return tuple(_REGISTRY)


def file_runtimes() -> tuple[str, ...]:
    """The runtimes that write a file (all but eager)."""
    return tuple(name for name, runtime in _REGISTRY.items() if runtime.suffix is not None)


def runtime_for_file(path: str | Path) -> Runtime:
    """The runtime whose files end like ``path``; a ValueError lists the known suffixes."""
    suffix = Path(path).suffix
    for runtime in _REGISTRY.values():
        if runtime.suffix == suffix:
            return runtime
    known = {r.suffix: r.name for r in _REGISTRY.values() if r.suffix}
    raise ValueError(f"{path}: no runtime writes {suffix or 'suffix-less'} files; known: {known}.")


# ---- the built-in adapters ---------------------------------------------------------------------------------------

def _profile_torch(program, path, x, *, quantized=False, delegate_dtype=None, threads=None, runtime="eager"):
    from lightning_segcompress.benchmark.profile import profile_torch

    return profile_torch(program, x, quantized=quantized, runtime=runtime)


def _export_lite(model, example, path):
    from lightning_segcompress.benchmark.torchscript_lite import export_torchscript_lite

    return export_torchscript_lite(model, example, path)


def _load_lite(path, threads=None):
    from lightning_segcompress.benchmark.torchscript_lite import load_lite

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "Lite Interpreter is deprecated"
        return load_lite(path)


def _lite_refuses(model: nn.Module) -> str | None:
    from lightning_segcompress.benchmark.runner import is_int8
    from lightning_segcompress.utils.inspection import has_int8_modules

    if is_int8(model) and not has_int8_modules(model):
        return ("a PT2E int8 graph (quantize/dequantize ops) does not load in the lite interpreter; it runs on "
                "ExecuTorch or ONNX Runtime (quantize with backend fx for lite)")
    return None


def _profile_lite(program, path, x, **kwargs):
    return _profile_torch(program, path, x, **{**kwargs, "runtime": "torchscript_lite"})


def _executorch_available():
    from lightning_segcompress.benchmark.executorch_runtime import executorch_available

    return executorch_available()


def _no_fx_int8(target: str) -> Callable[[nn.Module], str | None]:
    def refuses(model: nn.Module) -> str | None:
        from lightning_segcompress.utils.inspection import has_int8_modules

        if has_int8_modules(model):
            return f"FX int8 modules run on TorchScript lite; quantize with backend pt2e for {target}"
        return None

    return refuses


def _export_executorch(model, example, path):
    from lightning_segcompress.benchmark.executorch_runtime import delegate_dtype, export_executorch

    info = export_executorch(model, example, path)
    info["delegate_dtype"] = delegate_dtype(info.get("ops"))
    return info


def _load_executorch(path, threads=None):
    from lightning_segcompress.benchmark.executorch_runtime import ExecuTorchProgram

    return ExecuTorchProgram(path, num_threads=threads)  # its thread pool ignores torch's setting


def _profile_executorch(program, path, x, *, quantized=False, delegate_dtype=None, threads=None):
    from lightning_segcompress.benchmark.profile import profile_executorch

    return profile_executorch(path, x, quantized=quantized, delegate_dtype=delegate_dtype)


def _onnx_available():
    from lightning_segcompress.benchmark.onnx_runtime import onnx_available

    return onnx_available()


def _onnx_refuses(model):
    from lightning_segcompress.benchmark.onnx_runtime import onnx_refuses

    return onnx_refuses(model)


def _export_onnx(model, example, path, **options):
    from lightning_segcompress.benchmark.onnx_runtime import export_onnx

    return export_onnx(model, example, path, **options)


def _load_onnx(path, threads=None):
    from lightning_segcompress.benchmark.onnx_runtime import OnnxProgram

    return OnnxProgram(path, num_threads=threads)


def _profile_onnx(program, path, x, *, quantized=False, delegate_dtype=None, threads=None):
    from lightning_segcompress.benchmark.onnx_runtime import profile_onnx

    return profile_onnx(path, x, quantized=quantized, threads=threads)


def _load_eager(module, threads=None):
    return module


register_runtime(Runtime("eager", "eager", None, load=_load_eager, profile=_profile_torch))
register_runtime(Runtime("torchscript_lite", "lite", ".ptl", refuses=_lite_refuses, export=_export_lite,
                         load=_load_lite, profile=_profile_lite))
register_runtime(Runtime("executorch", "ExecuTorch", ".pte", available=_executorch_available,
                         refuses=_no_fx_int8("ExecuTorch"), export=_export_executorch, load=_load_executorch,
                         profile=_profile_executorch, extra="executorch"))
register_runtime(Runtime("onnxruntime", "ONNX Runtime", ".onnx", available=_onnx_available, refuses=_onnx_refuses,
                         export=_export_onnx, load=_load_onnx, profile=_profile_onnx, extra="onnx",
                         aliases=("onnx",), export_options=("dynamic", "opset", "calibration")))


def export_and_load(runtime: Runtime, module: nn.Module, x: torch.Tensor, folder: Path, threads: int | None):
    """``module`` exported to ``folder`` and loaded back in ``runtime`` (eager: the module itself)."""
    if runtime.suffix is None:
        return module
    info = runtime.export(module, x, folder / runtime.artifact)
    return runtime.load(info["path"], threads)
