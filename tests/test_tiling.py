import pytest
import torch
from torch import nn

from conftest import SMP_UNET
from lightning_segcompress.benchmark.runner import LogitsOnly
from lightning_segcompress.benchmark.torchscript_lite import export_torchscript_lite, load_lite
from lightning_segcompress.memory import TiledInference, TilingError, measured_peak_bytes, memory_report
from lightning_segcompress.models import build_network

DEEPLAB_LARGE = {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                 "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}}
TV_DEEPLAB = {"class_path": "torchvision.models.segmentation.deeplabv3_mobilenet_v3_large",
              "init_args": {"aux_loss": True}}
TV_LRASPP = {"class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"}


def _untiled_and_tiled(spec, shape, grid, split_after=None):
    net = LogitsOnly(build_network(spec, num_classes=3)).eval()
    x = torch.randn(*shape)
    tiled = TiledInference(net, shape, grid, split_after)
    with torch.no_grad():
        return net(x), tiled(x), tiled


@pytest.mark.parametrize(("spec", "shape", "grids"), [
    (DEEPLAB_LARGE, (1, 3, 64, 96), [(2, 2), (1, 3)]),
    (SMP_UNET, (2, 3, 96, 64), [(2, 2), (3, 2)]),
    (TV_LRASPP, (1, 3, 67, 93), [(2, 3), (4, 4)]),  # odd sizes: uneven tiles, odd halos at the border
    (TV_DEEPLAB, (1, 3, 75, 61), [(3, 2)]),
], ids=["smp-deeplabv3plus", "smp-unet", "tv-lraspp-odd", "tv-deeplabv3-odd"])
def test_tiled_equals_untiled(spec, shape, grids):
    for grid in grids:
        expected, actual, tiled = _untiled_and_tiled(spec, shape, grid)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
        assert tiled.plan.macs_ratio > 1.0  # halos are recomputed


def test_prefix_stops_before_the_first_global_op():
    _, _, deeplab = _untiled_and_tiled(DEEPLAB_LARGE, (1, 3, 64, 64), (2, 2))
    assert "encoder.model.blocks.2.0.se" in deeplab.plan.stop and "aten.mean" in deeplab.plan.stop
    _, _, unet = _untiled_and_tiled(SMP_UNET, (1, 3, 64, 64), (2, 2))
    assert "upsample" in unet.plan.stop  # resnet has no global op: the whole encoder is tiled
    assert len(unet.plan.outputs) == 3  # the skip features the decoder reads, stitched


def test_split_after_ends_the_prefix_at_a_named_module():
    expected, actual, tiled = _untiled_and_tiled(SMP_UNET, (1, 3, 64, 64), (2, 2), split_after="encoder.layer1")
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert "split_after" in tiled.plan.stop
    assert all("layer2" not in str(n.meta.get("nn_module_stack")) for n in tiled.plan.prefix)


class MutatesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(a)
        a.relu_()  # tiles run in-place ops on views of their regions; the sum must see the mutation
        return a + b


def test_in_place_ops_keep_eager_semantics():
    net = MutatesInPlace().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(TiledInference(net, x.shape, (2, 2))(x), net(x), atol=1e-6, rtol=0)


def test_one_tile_adds_no_work():
    expected, actual, tiled = _untiled_and_tiled(SMP_UNET, (1, 3, 64, 64), (1, 1))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert tiled.plan.macs_ratio == 1.0


class WideStem(nn.Module):
    """A classifier-like net whose activation peak is in its high-resolution, fully convolutional stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 8, 3, stride=2, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.head(self.stem(x))


def test_tiling_lowers_planned_and_measured_memory_when_the_peak_is_in_the_prefix():
    net = WideStem().eval()
    x = torch.randn(1, 3, 128, 128)
    tiled = TiledInference(net, x.shape, (4, 4))
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), net(x), atol=1e-5, rtol=0)
    untiled_plan, tiled_plan = memory_report(net, x, measure=False), memory_report(tiled, x, measure=False)
    assert tiled_plan.fp32.planned < untiled_plan.fp32.planned / 4
    assert measured_peak_bytes(tiled, x) < measured_peak_bytes(net, x) / 4


def test_tiled_model_exports_to_the_lite_interpreter(tmp_path):
    net = build_network(TV_LRASPP, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 80)
    tiled = LogitsOnly(TiledInference(net, x.shape, (2, 2)))
    info = export_torchscript_lite(tiled, x, tmp_path / "tiled.ptl")
    with torch.no_grad():
        torch.testing.assert_close(load_lite(info["path"])(x), net(x)["out"], atol=1e-4, rtol=0)


class GlobalFirst(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=(2, 3), keepdim=True)


def test_refusals_name_the_cause():
    deeplab = build_network(DEEPLAB_LARGE, num_classes=3)
    with pytest.raises(TilingError, match=r"Cannot tile up to 'encoder.model.blocks.3'.*encoder.model.blocks.2.0.se"):
        TiledInference(deeplab, (1, 3, 64, 64), (2, 2), split_after="encoder.model.blocks.3")
    with pytest.raises(TilingError, match="names no module"):
        TiledInference(deeplab, (1, 3, 64, 64), (2, 2), split_after="encoder.no_such_layer")
    with pytest.raises(TilingError, match="finer than the prefix output"):
        TiledInference(deeplab, (1, 3, 64, 64), (16, 16))
    with pytest.raises(TilingError, match="Nothing to tile"):
        TiledInference(GlobalFirst(), (1, 3, 16, 16), (2, 2))
    with pytest.raises(TilingError, match="grid must be"):
        TiledInference(deeplab, (1, 3, 64, 64), (0, 2))
    tiled = TiledInference(deeplab, (1, 3, 64, 64), (2, 2))
    with pytest.raises(TilingError, match=r"built for inputs \[1, 3, 64, 64\], got \[1, 3, 96, 64\]"):
        tiled(torch.randn(1, 3, 96, 64))
    assert deeplab.training, "building a tiled program leaves the user's network in its mode"
