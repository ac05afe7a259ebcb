"""A cache of torchao's PT2E pattern graphs: per process, and on disk for the processes of one test run.

torchao builds the small graphs it matches and replaces (conv + BN for QAT fusion and folding, dropout and BN for
``move_exported_model_to_train/eval``) by running ``torch.export`` on a pattern function at every call: 126
exports for one QAT prepare + convert of a DeepLabV3+ (24 + 102; about 25 s of its 36 s at 1 thread on this CPU),
and 6 more at every train/eval switch. The graph
depends only on the pattern's code, its closure (flags and the conv function) and the example inputs' shapes and
dtypes, so the tests export each pattern once per process and hand out copies. Library code is unchanged: users get
torchao's own behaviour, and a torchao without the private function leaves the cache uninstalled.

With a cache folder (:func:`set_cache_dir`, or ``SEGCOMPRESS_PT2E_PATTERN_CACHE`` in the environment, which the
subprocesses the tests start inherit), each exported pattern is also saved there with ``torch.export.save``, and
another process of the same run (the other pytest-xdist worker, a fresh-process restore) loads it (~0.03 s) instead
of exporting it again (~0.2 s each). The loaded program goes through torchao's own post-processing: torchao's
function runs as usual, with ``torch.export.export`` answering with the loaded program.
"""

import copy
import hashlib
import importlib
import os
from pathlib import Path

import torch

_MODULES = ("torchao.quantization.pt2e.utils", "torchao.quantization.pt2e.qat_utils",
            "torchao.quantization.pt2e.reference_representation_rewrite")
_NAME = "_get_aten_graph_module_for_pattern"
ENV = "SEGCOMPRESS_PT2E_PATTERN_CACHE"
_cache_dir: Path | None = None


def set_cache_dir(path) -> None:
    """Save and load pattern graphs in ``path`` (created if needed; ``None``: memory only), for this process and
    the processes it starts."""
    global _cache_dir
    _cache_dir = None if path is None else Path(path)
    if _cache_dir is None:
        os.environ.pop(ENV, None)
    else:
        _cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ[ENV] = str(_cache_dir)


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value


def _function(pattern):
    if isinstance(pattern, torch.nn.Module):  # torchao's WrapperModule(fn): the function is the pattern
        if type(pattern).__name__ != "WrapperModule" or any(True for _ in pattern.state_dict()):
            return None
        pattern = getattr(pattern, "fn", None)
    return pattern if getattr(pattern, "__code__", None) is not None else None


def _key(pattern, example_inputs, is_cuda, kwargs):
    pattern = _function(pattern)
    if pattern is None:  # another callable: no cheap identity, export it every time
        return None
    try:
        closure = tuple(cell.cell_contents for cell in (pattern.__closure__ or ()))
    except ValueError:  # an empty cell
        return None
    key = (pattern.__code__, closure, _signature(tuple(example_inputs)), is_cuda,
           tuple(sorted((k, _signature(v)) for k, v in kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _stable(value):
    """A text for ``value`` that is the same in every process (no object addresses), or None."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, tuple):
        parts = [_stable(v) for v in value]
        return None if None in parts else "(" + ",".join(parts) + ")"
    if callable(value):
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
        return None if name is None or "<locals>" in name else f"{getattr(value, '__module__', None)}.{name}"
    return None


def _code_text(code) -> str:
    """The code object's place, bytes and constants (nested code objects the same way, not by address)."""
    consts = tuple(_code_text(c) if hasattr(c, "co_code") else repr(c) for c in code.co_consts)
    return repr((code.co_filename, code.co_firstlineno, code.co_qualname, code.co_code, consts))


def _file_name(key) -> str | None:
    """The cache file of ``key``: a hash of the pattern's code (bytes, constants and place), closure and inputs,
    and of the torch / torchao versions."""
    code, closure, inputs, is_cuda, kwargs = key
    closure_text = _stable(closure)
    if closure_text is None:
        return None
    import torchao

    text = repr((torch.__version__, torchao.__version__, _code_text(code), closure_text, inputs, is_cuda, kwargs))
    return hashlib.sha256(text.encode()).hexdigest()[:32] + ".pt2"


class _ExportAnswers:
    """Within ``with``: ``torch.export.export`` returns ``program`` if given, else exports and keeps what it made."""

    def __init__(self, program=None) -> None:
        self.program = program

    def __enter__(self):
        self.original = torch.export.export

        def export(*args, **kwargs):
            if self.program is None:
                self.program = self.original(*args, **kwargs)
            return self.program

        torch.export.export = export
        return self

    def __exit__(self, *exc) -> None:
        torch.export.export = self.original


def _from_disk(original, name, pattern, example_inputs, is_cuda, kwargs):
    path = _cache_dir / name
    if path.is_file():
        try:
            program = torch.export.load(str(path))
        except Exception:  # a half-written or foreign file: export it again
            program = None
        if program is not None:
            with _ExportAnswers(program):
                return original(pattern, example_inputs, is_cuda, **kwargs)
    with _ExportAnswers() as answers:
        graph = original(pattern, example_inputs, is_cuda, **kwargs)
    if answers.program is not None:
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            torch.export.save(answers.program, str(temporary))
            os.replace(temporary, path)  # atomic: another process sees the whole file or none
        except Exception:  # the cache is an optimisation: a program that does not serialize is exported each time
            temporary.unlink(missing_ok=True)
    return graph


def install() -> bool:
    """Wrap torchao's pattern exporter with the cache in every module that imported it; False if absent."""
    if _cache_dir is None and os.environ.get(ENV):
        set_cache_dir(os.environ[ENV])
    try:
        utils = importlib.import_module(_MODULES[0])
    except ImportError:
        return False
    original = getattr(utils, _NAME, None)
    if original is None or getattr(original, "_segcompress_cached", False):
        return original is not None
    cache = {}

    def cached(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in cache:
            name = _file_name(key) if _cache_dir is not None else None
            if name is None:
                cache[key] = original(pattern, example_inputs, is_cuda, **kwargs)
            else:
                cache[key] = _from_disk(original, name, pattern, example_inputs, is_cuda, kwargs)
        return copy.deepcopy(cache[key])

    cached._segcompress_cached = True
    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, _NAME, None) is original:
            setattr(module, _NAME, cached)
    return True
