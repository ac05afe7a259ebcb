"""Build a segmentation network from plain data: ``{"class_path": ..., "init_args": {...}}``.

The spec is plain data so that it can live in YAML and in checkpoint hyperparameters (reloading rebuilds
the network from it, no pickled modules). ``class_path`` may name a class (``segmentation_models_pytorch.Unet``)
or a builder function (``torchvision.models.segmentation.lraspp_mobilenet_v3_large``).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

# Keyword under which known builders take the number of output classes.
_CLASS_COUNT_KWARGS = ("classes", "num_classes", "n_classes")
# Builders that would try to download pretrained weights unless told not to.
_OFFLINE_DEFAULTS = {"encoder_weights": None, "weights": None, "weights_backbone": None}


def resolve_class_path(class_path: str) -> Callable[..., Any]:
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {class_path!r} must be a dotted path like 'package.module.Class'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"Cannot import {module_name!r} for class_path {class_path!r}: {err}") from err
    if not hasattr(module, attr):
        raise ImportError(f"Module {module_name!r} has no attribute {attr!r} (class_path {class_path!r}).")
    return getattr(module, attr)


def build_network(spec: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """Instantiate a network from ``{"class_path": str, "init_args": dict}``.

    If ``num_classes`` is given and the builder takes ``classes``/``num_classes`` (smp, torchvision) but the
    spec does not set it, it is filled in; a conflicting value is an error. Builders that accept
    ``encoder_weights``/``weights``/``weights_backbone`` default to ``None`` (no downloads).
    """
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(
            "network must be a mapping like {'class_path': 'segmentation_models_pytorch.Unet', "
            f"'init_args': {{'encoder_name': 'resnet18'}}}}, got {spec!r}."
        )
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"network spec has unknown keys {sorted(unknown)}; use 'class_path' and 'init_args'.")
    builder = resolve_class_path(spec["class_path"])
    kwargs = dict(copy.deepcopy(spec.get("init_args") or {}))
    accepted = _accepted_kwargs(builder)

    for key, value in _OFFLINE_DEFAULTS.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    if num_classes is not None:
        count_kwarg = next((k for k in _CLASS_COUNT_KWARGS if k in accepted), None)
        if count_kwarg is not None:
            given = kwargs.setdefault(count_kwarg, num_classes)
            if given != num_classes:
                raise ValueError(
                    f"network init_args sets {count_kwarg}={given} but num_classes={num_classes}; "
                    "remove it from init_args or make the two agree."
                )
    try:
        network = builder(**kwargs)
    except TypeError as err:  # wrong or missing init_args
        raise TypeError(f"Cannot build {spec['class_path']} with init_args {kwargs}: {err}") from err
    if not isinstance(network, nn.Module):
        raise TypeError(f"{spec['class_path']} returned {type(network).__name__}, not an nn.Module.")
    return network


def _accepted_kwargs(builder: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return set()
    return {name for name, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
