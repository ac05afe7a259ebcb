"""A per-process cache of torchao's PT2E pattern graphs.

torchao builds the small graphs it matches and replaces (conv + BN for QAT fusion and folding, dropout and BN for
``move_exported_model_to_train/eval``) by running ``torch.export`` on a pattern function at every call: 126
exports for one QAT prepare + convert of a DeepLabV3+ (24 + 102; about 25 s of its 36 s at 1 thread on this CPU),
and 6 more at every train/eval switch. The graph
depends only on the pattern's code, its closure (flags and the conv function) and the example inputs' shapes and
dtypes, so the tests export each pattern once per process and hand out copies. Library code is unchanged: users get
torchao's own behaviour, and a torchao without the private function leaves the cache uninstalled.
"""

import copy
import importlib

import torch

_MODULES = ("torchao.quantization.pt2e.utils", "torchao.quantization.pt2e.qat_utils",
            "torchao.quantization.pt2e.reference_representation_rewrite")
_NAME = "_get_aten_graph_module_for_pattern"


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value


def _key(pattern, example_inputs, is_cuda, kwargs):
    if isinstance(pattern, torch.nn.Module):  # torchao's WrapperModule(fn): the function is the pattern
        if type(pattern).__name__ != "WrapperModule" or any(True for _ in pattern.state_dict()):
            return None
        pattern = getattr(pattern, "fn", None)
    code = getattr(pattern, "__code__", None)
    if code is None:  # another callable: no cheap identity, export it every time
        return None
    try:
        closure = tuple(cell.cell_contents for cell in (pattern.__closure__ or ()))
    except ValueError:  # an empty cell
        return None
    key = (code, closure, _signature(tuple(example_inputs)), is_cuda,
           tuple(sorted((k, _signature(v)) for k, v in kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def install() -> bool:
    """Wrap torchao's pattern exporter with the cache in every module that imported it; False if absent."""
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
            cache[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(cache[key])

    cached._segcompress_cached = True
    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, _NAME, None) is original:
            setattr(module, _NAME, cached)
    return True
