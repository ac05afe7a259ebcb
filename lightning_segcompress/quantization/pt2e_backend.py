"""PT2E quantization (torch.export + torchao) with the XNNPACK quantizer, lowered to ExecuTorch for mobile."""

from __future__ import annotations

import copy
import types
import warnings

import torch
from torch import nn

from lightning_segcompress.quantization.config import QuantizationConfig, QuantizationError
from lightning_segcompress.quantization.tracing import tracing_friendly

# What stays float in a PT2E int8 MobileNetV3 / ResNet segmentation net lowered to ExecuTorch 1.5 (XNNPACK), and why;
# everything else the XNNPACK quantizer annotates (conv+BN(+ReLU), add, mul, cat, adaptive average pooling) is int8.
XNNPACK_FLOAT_OPS = {
    "aten.hardswish.default": "XNNPACK's partitioner takes hardswish in fp32 only",
    "aten.upsample_bilinear2d.vec": "XNNPACK's partitioner takes bilinear resize in fp32 only",
    "aten.div.Tensor": "hardsigmoid (the squeeze-excite gate) is decomposed into add, clamp and div; div is fp32 only",
    "aten.clamp.default": "the clamp of that hardsigmoid decomposition, between float ops",
    "aten.add.Tensor": "the +3 of that hardsigmoid decomposition (residual adds are int8)",
    "aten.mean.dim": "timm's squeeze-excite pools with mean(), which the XNNPACK quantizer does not annotate",
    "dim_order_ops._to_dim_order_copy.default": "NCHW <-> NHWC at the program's input and output (portable kernel)",
}

_BN_FROZEN = "_segcompress_bn_frozen"
_GRAPH_MODE = "_segcompress_graph_mode"  # (training, bn_frozen) the graph's ops are in


def _quantizer(config: QuantizationConfig):
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    except ImportError as err:
        raise QuantizationError(f"backend pt2e needs executorch's XNNPACK quantizer ({err}): "
                                "pip install 'lightning-segcompress[executorch]'.") from err
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=config.per_channel, is_qat=config.qat))
    if config.keep_float:  # the quantizer's set_module_name(name, None) asserts: filter the graph's nodes instead
        quantizer.set_filter_function(_outside(config.keep_float))
    return quantizer


def _outside(module_names: tuple[str, ...]):
    """A node filter: True for nodes that torch.export did not trace inside one of ``module_names``."""
    def keep(node: torch.fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack", {})
        paths = {_module_path(path) for path, _ in stack.values()}
        return not any(path == name or path.startswith(name + ".") for path in paths for name in module_names)
    return keep


def _module_path(export_path: str) -> str:
    """torch.export's ``L['self'].encoder.layer1[0]`` (or ``encoder.layer1.0``) -> ``encoder.layer1.0``."""
    path = export_path.removeprefix("L['self']").removeprefix("L__self__").lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def export_network(network: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """torch.export as a trainable GraphModule (parameter names kept) whose batch, height and width stay dynamic
    where the network allows it: trained at the training crop, exported later at the deployment size."""
    auto = torch.export.Dim.AUTO
    try:
        with tracing_friendly(network), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(network, (example,), dynamic_shapes=({0: auto, 2: auto, 3: auto},)).module()
    except Exception as err:
        raise QuantizationError(
            f"torch.export cannot export {type(network).__name__} for PT2E quantization: {type(err).__name__}: "
            f"{str(err).strip()[:800]}\nFix the op named above (data-dependent Python control flow, an "
            "unsupported op) or use backend: fx with that module in keep_float.") from err


def prepare_pt2e(network: nn.Module, config: QuantizationConfig, example: torch.Tensor) -> torch.fx.GraphModule:
    """Export and insert fake-quant (QAT) or observers (PTQ). ``.train()`` / ``.eval()`` keep working on the
    result (they switch batch norm and dropout in the graph), as Lightning calls them."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e as ao_prepare_pt2e
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    quantizer = _quantizer(config)
    was_training = network.training
    network.train(config.qat)
    try:
        exported = export_network(network, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = (prepare_qat_pt2e if config.qat else ao_prepare_pt2e)(exported, quantizer)
    except QuantizationError:
        raise
    except Exception as err:
        raise QuantizationError(f"PT2E could not prepare {type(network).__name__}: {type(err).__name__}: {err}. "
                                "Name the offending module in keep_float.") from err
    finally:
        network.train(was_training)
    _allow_train_eval(prepared, training=config.qat)
    prepared.train(was_training)
    return prepared


def convert_pt2e(prepared: nn.Module) -> torch.fx.GraphModule:
    """A CPU copy with quantize/dequantize ops (reference int8, fp32 speed until lowered to ExecuTorch);
    ``prepared`` stays where it is (e.g. on the GPU it trained on)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as ao_convert_pt2e

    unobserved = [name for name, m in prepared.named_modules() if _saw_no_data(m)]
    if unobserved:
        raise QuantizationError(
            f"{len(unobserved)} observer(s) have seen no data (e.g. {unobserved[0]}): no forward pass ran with "
            "observers enabled between prepare and convert. Calibrate on at least one batch, or let QAT observe at "
            "least one epoch before freeze_observer_epoch.")
    model = copy.deepcopy(prepared).cpu()
    model.eval()
    _sync_graph_mode(model)  # the graph's batch-norm ops in eval form before they are folded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = ao_convert_pt2e(model)
        except AssertionError as err:
            if "should be less than max" not in str(err):
                raise
            raise QuantizationError(
                "An observer has seen no data (its range is still [inf, -inf]): no forward pass ran with observers "
                "enabled between prepare and convert. Calibrate on at least one batch, or let QAT observe at least "
                "one epoch before freeze_observer_epoch.") from None
    _allow_train_eval(converted, training=False)
    return converted


def _saw_no_data(module: nn.Module) -> bool:
    """An activation observer still at its initial range ([inf, -inf]); per-channel weight observers, which are
    empty until their first forward, are left to torchao (which then uses default parameters)."""
    low, high = getattr(module, "min_val", None), getattr(module, "max_val", None)
    if not isinstance(low, torch.Tensor) or not isinstance(high, torch.Tensor) or low.numel() == 0:
        return False
    return bool(torch.isinf(low).all() and torch.isinf(high).all() and (low > high).all())


def freeze_batchnorm_pt2e(prepared: nn.Module) -> None:
    """Batch norm uses (and stops updating) its running statistics from now on, in train mode too."""
    setattr(prepared, _BN_FROZEN, True)


def _allow_train_eval(model: torch.fx.GraphModule, training: bool) -> None:
    """Let ``.train()`` / ``.eval()`` work on an exported graph, as Lightning calls them.

    An exported graph has its batch-norm and dropout ops baked in; ``torchao``'s ``move_exported_model_to_*``
    rewrite them. Lightning also sets ``.training`` flags directly after validation, so the graph is brought
    in line with ``self.training`` at the start of each forward rather than inside ``train()`` (a forward
    pre-hook would be too late: the module has already picked the old compiled forward).
    """
    def train(self, mode: bool = True):
        self.training = mode
        for child in self.children():
            child.train(mode)
        return self

    def forward(self, *args, **kwargs):
        _sync_graph_mode(self)
        return type(self).forward(self, *args, **kwargs)

    model.train = types.MethodType(train, model)
    model.eval = types.MethodType(lambda self: self.train(False), model)
    model.forward = types.MethodType(forward, model)
    model.training = training
    model.__dict__[_GRAPH_MODE] = (training, getattr(model, _BN_FROZEN, False))


def _sync_graph_mode(module: nn.Module) -> None:
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.export_utils import _replace_batchnorm

    wanted = (module.training, getattr(module, _BN_FROZEN, False))
    if module.__dict__.get(_GRAPH_MODE) == wanted:
        return
    (move_exported_model_to_train if wanted[0] else move_exported_model_to_eval)(module)
    if wanted == (True, True):
        _replace_batchnorm(module, train_to_eval=True)
    module.__dict__[_GRAPH_MODE] = wanted


def shape_observers(prepared: nn.Module, example: torch.Tensor) -> None:
    """One forward so that per-channel scales and observer ranges take their real shapes; a state dict loaded
    afterwards then fits (torchao's fake-quant modules do not resize on load, unlike torch.ao's)."""
    was_training = prepared.training
    with torch.no_grad():
        prepared(example)
    prepared.train(was_training)
