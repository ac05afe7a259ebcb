"""Quantization core (pure torch): FX and PT2E prepare/convert, PTQ calibration, plain-data restore, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_segcompress import load_compressed
from lightning_segcompress.benchmark.executorch_runtime import executorch_available, export_executorch
from lightning_segcompress.benchmark.torchscript_lite import export_torchscript_lite, load_lite
from lightning_segcompress.models import build_network
from lightning_segcompress.quantization import (
    QuantizationConfig,
    QuantizationError,
    calibrate,
    convert_network,
    freeze_batchnorm,
    freeze_observers,
    prepare_network,
    quantization_stage,
)
from lightning_segcompress.quantization.fx_backend import dilated_depthwise_convs
from lightning_segcompress.state import get_stages, write_to_checkpoint
from lightning_segcompress.utils.inspection import extract_logits, has_int8_modules
from support.common import SMP_DEEPLAB, SMP_UNET, TV_LRASPP


def _trained_unet(steps=30):
    """A tiny Unet fitted to a fixed batch, so its activations have realistic ranges."""
    torch.manual_seed(0)
    net = build_network(SMP_UNET, num_classes=4)
    images = F.interpolate(torch.randn(4, 3, 8, 8), size=(64, 64), mode="bilinear")  # smooth regions
    masks = (images[:, 0] > 0).long() + 2 * (images[:, 1] > 0.5).long()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(net(images), masks).backward()
        optimizer.step()
    return net.eval(), images, masks


def _qat(net, config, images, masks, steps=5):
    prepared = prepare_network(net, config)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.001)
    prepared.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(extract_logits(prepared(images)), masks).backward()
        optimizer.step()
    freeze_observers(prepared)
    freeze_batchnorm(prepared)
    return prepared.eval()


def _relative_error(a, b):
    """Mean absolute difference relative to the mean magnitude (int8 rounding moves single pixels by a few
    quantization steps, so the max is not a fair measure)."""
    return float((a - b).abs().mean() / b.abs().mean())


def test_fx_qat_converts_to_int8_modules_that_match_fake_quant_and_shrink_the_lite_file(tmp_path):
    net, images, masks = _trained_unet()
    prepared = _qat(net, QuantizationConfig(backend="fx"), images, masks)
    int8 = convert_network(prepared)
    assert has_int8_modules(int8)  # real int8 conv modules
    assert quantization_stage(int8) == {**quantization_stage(prepared), "converted": True}
    with torch.no_grad():
        fake, real = prepared(images), int8(images)
    assert _relative_error(real, fake) < 0.05
    assert (real.argmax(1) == fake.argmax(1)).float().mean() > 0.95
    fp32 = export_torchscript_lite(net, images[:1], tmp_path / "fp32.ptl")
    q = export_torchscript_lite(int8, images[:1], tmp_path / "int8.ptl")
    assert q["size_bytes"] < 0.5 * fp32["size_bytes"]
    lite = load_lite(tmp_path / "int8.ptl")
    assert torch.allclose(lite(images[:1]), int8(images[:1]), atol=1e-4)


def test_fx_ptq_calibrates_observers_then_converts():
    net, images, _ = _trained_unet()
    prepared = prepare_network(net, QuantizationConfig(backend="fx", qat=False))
    assert calibrate(prepared, [images[:2], images[2:], images], num_batches=2) == 2
    int8 = convert_network(prepared)
    with torch.no_grad():
        assert _relative_error(int8(images), net(images)) < 0.15


def test_the_float_network_is_left_usable_and_preparing_twice_is_refused():
    net, images, _ = _trained_unet(steps=1)
    with torch.no_grad():
        before = net(images)
    prepared = prepare_network(net, QuantizationConfig(backend="fx"))
    with torch.no_grad():
        assert torch.equal(net(images), before)
    with pytest.raises(QuantizationError, match="already prepared"):
        prepare_network(prepared, QuantizationConfig(backend="fx"))
    with pytest.raises(QuantizationError, match="was not prepared"):
        convert_network(net)


@pytest.mark.parametrize("spec", [SMP_DEEPLAB, TV_LRASPP], ids=["smp-deeplabv3plus-mnv3", "torchvision-lraspp"])
def test_fx_handles_mobilenetv3_models_and_dict_outputs(spec):
    torch.manual_seed(0)
    net = build_network(spec, num_classes=4).eval()
    images = torch.randn(2, 3, 64, 64)
    prepared = prepare_network(net, QuantizationConfig(backend="fx", qat=False))
    calibrate(prepared, [images])
    int8 = convert_network(prepared)
    out = int8(images)
    assert extract_logits(out).shape == (2, 4, 64, 64)
    assert isinstance(out, dict) == isinstance(net(images), dict)
    assert has_int8_modules(int8)
    # every BN folded into its conv (timm's BatchNormAct2d included); dilated depthwise convs stay float
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.modules())
    float_convs = {n for n, m in int8.named_modules() if type(m) in (nn.Conv2d, torch.ao.nn.intrinsic.ConvBn2d)}
    assert float_convs == set(dilated_depthwise_convs(net))


def test_a_failed_prepare_leaves_the_float_network_exactly_as_it_was():
    net = build_network(SMP_DEEPLAB, num_classes=4)
    net.segmentation_head = nn.Sequential(net.segmentation_head, Gate())
    keys, modules = list(net.state_dict()), [type(m) for m in net.modules()]
    with pytest.raises(QuantizationError, match="segmentation_head.1"):
        prepare_network(net, QuantizationConfig(backend="fx"))
    assert list(net.state_dict()) == keys and [type(m) for m in net.modules()] == modules


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent Python branch: torch.fx cannot trace it
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = Gate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)))


def test_an_untraceable_module_is_named_with_the_fix_and_keep_float_fixes_it():
    net = GatedNet()
    with pytest.raises(QuantizationError, match=r"cannot trace module 'gate' \(Gate\).*keep_float: \[gate\]"):
        prepare_network(net, QuantizationConfig(backend="fx"))
    prepared = prepare_network(net, QuantizationConfig(backend="fx", qat=False, keep_float=("gate",)))
    calibrate(prepared, [torch.randn(2, 3, 16, 16)])
    int8 = convert_network(prepared)
    assert isinstance(int8.gate, Gate)  # kept as the float module
    assert int8(torch.randn(2, 3, 16, 16)).shape == (2, 4, 16, 16)


def test_pt2e_export_failure_is_a_quantization_error_naming_the_cause():
    pytest.importorskip("executorch")
    with pytest.raises(QuantizationError, match="torch.export cannot export GatedNet"):
        prepare_network(GatedNet(), QuantizationConfig(backend="pt2e"))


@pytest.mark.parametrize("backend", ["fx", "pt2e"])
def test_prepared_checkpoint_restores_into_a_fresh_float_network_without_pickle(backend, tmp_path):
    if backend == "pt2e":
        pytest.importorskip("executorch")
    net, images, masks = _trained_unet(steps=5)
    prepared = _qat(net, QuantizationConfig(backend=backend), images, masks, steps=2)
    checkpoint = {"state_dict": prepared.state_dict()}
    write_to_checkpoint(checkpoint, prepared, "")
    torch.save(checkpoint, tmp_path / "qat.pt")
    restored = load_compressed(build_network(SMP_UNET, num_classes=4), tmp_path / "qat.pt").eval()
    assert get_stages(restored) == get_stages(prepared)
    with torch.no_grad():
        assert torch.allclose(restored(images), prepared(images), atol=1e-5)
        if backend == "fx":  # (PT2E conversion is covered by the lowering test; it is slow on 2 cores)
            assert torch.allclose(convert_network(restored)(images), convert_network(prepared)(images), atol=1e-5)


def test_pt2e_trains_with_batchnorm_following_train_and_eval(tmp_path):
    pytest.importorskip("executorch")
    net, images, masks = _trained_unet(steps=5)
    prepared = prepare_network(net, QuantizationConfig(backend="pt2e"))
    freeze_observers(prepared)
    bn_mean = next(v for k, v in prepared.state_dict().items() if k.endswith("running_mean"))
    prepared.eval()
    before = bn_mean.clone()
    prepared(images)
    assert torch.equal(bn_mean, before)  # eval: running statistics untouched
    prepared.training = True  # as Lightning restores modes after validation: set directly, no train() call
    prepared(images)
    assert not torch.equal(bn_mean, before)  # train: batch statistics update them
    freeze_batchnorm(prepared)
    frozen = bn_mean.clone()
    prepared(images)
    assert torch.equal(bn_mean, frozen)


@pytest.mark.slow
def test_pt2e_lowers_to_an_int8_executorch_program_smaller_than_fp32(tmp_path):
    available, reason = executorch_available()
    if not available:
        pytest.skip(reason)
    net, images, masks = _trained_unet()
    prepared = _qat(net, QuantizationConfig(backend="pt2e"), images, masks, steps=2)
    int8 = convert_network(prepared)
    ops = {str(n.target) for n in int8.graph.nodes}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize" in op for op in ops)
    fp32 = export_executorch(net, images[:1], tmp_path / "fp32.pte")
    q = export_executorch(int8, images[:1], tmp_path / "int8.pte")
    assert q["size_bytes"] < 0.5 * fp32["size_bytes"]
    with torch.no_grad():
        fake, real = prepared(images), int8(images)
    assert (real.argmax(1) == fake.argmax(1)).float().mean() > 0.95


def test_pt2e_keep_float_leaves_the_named_modules_float_and_quantizes_the_rest():
    pytest.importorskip("executorch")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1)])
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.blocks[0](self.stem(x)))

    def int8_weight(node):  # a quantized conv reads its weight through a dequantize
        return "dequantize" in str(getattr(node.args[1], "target", ""))

    for keep_float, expected in (((), [True, True, True]), (("blocks.0",), [True, False, True]),
                                 (("stem",), [False, True, True])):
        config = QuantizationConfig(backend="pt2e", qat=False, keep_float=keep_float, example_shape=(2, 3, 16, 16))
        prepared = prepare_network(Net().eval(), config)
        calibrate(prepared, [torch.randn(2, 3, 16, 16)])
        graph = convert_network(prepared).graph
        convs = [n for n in graph.nodes if "conv2d" in str(n.target)]
        assert [int8_weight(n) for n in convs] == expected, keep_float


def test_pt2e_convert_without_observed_data_names_the_cause():
    pytest.importorskip("executorch")
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    prepared = prepare_network(net, QuantizationConfig(backend="pt2e", qat=False, example_shape=(2, 3, 16, 16)))
    with pytest.raises(QuantizationError, match=r"observer\(s\) have seen no data"):
        convert_network(prepared)


@pytest.mark.slow
def test_pt2e_int8_covers_a_mobilenetv3_block_except_the_documented_float_ops(tmp_path):
    """A MobileNetV3 block with hardswish, squeeze-excite and a residual add, lowered to ExecuTorch: its
    convolutions, ReLU, SE multiply and residual add run int8; what runs float is only what is documented."""
    available, reason = executorch_available()
    if not available:
        pytest.skip(reason)
    import timm

    from lightning_segcompress.quantization.pt2e_backend import XNNPACK_FLOAT_OPS

    torch.manual_seed(0)
    block = timm.create_model("mobilenetv3_large_100", pretrained=False).blocks[4][1].eval()
    channels = block.conv_pw.in_channels
    prepared = prepare_network(block, QuantizationConfig(backend="pt2e", qat=False,
                                                         example_shape=(2, channels, 16, 16)))
    calibrate(prepared, [torch.randn(2, channels, 16, 16) for _ in range(2)])
    info = export_executorch(convert_network(prepared), torch.randn(1, channels, 16, 16), tmp_path / "block.pte")
    int8 = {o["op"] for o in info["ops"] if o["dtype"] == "int8"}
    assert {"aten.convolution.default", "aten.relu.default", "aten.mul.Tensor", "aten.add.Tensor"} <= int8
    assert not [o for o in info["ops"] if o["op"] == "aten.convolution.default" and o["dtype"] != "int8"]
    islands = {o["op"] for o in info["float_islands"]}
    assert islands and islands <= set(XNNPACK_FLOAT_OPS), islands - set(XNNPACK_FLOAT_OPS)
