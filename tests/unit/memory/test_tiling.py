import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_segcompress.benchmark import BenchmarkSettings, LogitsOnly, benchmark_network
from lightning_segcompress.benchmark.executorch_runtime import executorch_available
from lightning_segcompress.benchmark.torchscript_lite import export_torchscript_lite, load_lite
from lightning_segcompress.memory import TiledInference, TilingError, measured_peak_bytes, memory_report
from lightning_segcompress.models import build_network
from support.common import SMP_UNET

DEEPLAB_LARGE = {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                 "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}}
TV_DEEPLAB = {"class_path": "torchvision.models.segmentation.deeplabv3_mobilenet_v3_large",
              "init_args": {"aux_loss": True}}
TV_LRASPP = {"class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"}


def _untiled_and_tiled(spec, shape, grid, **options):
    net = LogitsOnly(build_network(spec, num_classes=3)).eval()
    x = torch.randn(*shape)
    tiled = TiledInference(net, shape, grid, **options)
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
        for max_stride in (8, None):
            expected, actual, tiled = _untiled_and_tiled(spec, shape, grid, max_stride=max_stride)
            assert actual.shape == expected.shape
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
            assert tiled.plan.macs_ratio > 1.0  # halos are recomputed


def test_segments_end_at_global_ops_and_max_stride():
    _, _, deeplab = _untiled_and_tiled(DEEPLAB_LARGE, (1, 3, 64, 64), (2, 2), max_stride=None)
    prefix, tail = deeplab.plan.segments["prefix"], deeplab.plan.segments["tail"]
    assert "encoder.model.blocks.2.0.se" in prefix.reason and "aten.mean" in prefix.reason
    assert "adaptive_avg_pool2d" in tail.reason  # the tail starts after ASPP's image pooling
    assert [n.name for n in tail.outputs] == [n.name for n in deeplab.graph_module.graph.output_node().all_input_nodes]
    _, _, unet = _untiled_and_tiled(SMP_UNET, (1, 3, 64, 64), (2, 2), max_stride=4)
    assert "more than max_stride=4" in unet.plan.segments["prefix"].reason
    assert len(unet.plan.segments["prefix"].outputs) == 2  # the skip features the tail reads, stitched
    assert "tail" in unet.plan.segments
    _, _, whole = _untiled_and_tiled(SMP_UNET, (1, 3, 64, 64), (2, 2), max_stride=None)
    assert list(whole.plan.segments) == ["prefix"] and "reaches the output" in whole.plan.segments["prefix"].reason
    with pytest.raises(TilingError, match="max_stride"):
        TiledInference(nn.Conv2d(3, 3, 1), (1, 3, 8, 8), (2, 2), max_stride=0)


def test_split_after_ends_the_prefix_at_a_named_module():
    expected, actual, tiled = _untiled_and_tiled(SMP_UNET, (1, 3, 64, 64), (2, 2), split_after="encoder.layer1",
                                                 tail=False)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    prefix = tiled.plan.segments["prefix"]
    assert "split_after" in prefix.reason and list(tiled.plan.segments) == ["prefix"]
    assert all("layer2" not in str(n.meta.get("nn_module_stack")) for n in prefix.nodes)


class ResamplingTail(nn.Module):
    """A global op, then a tail of bilinear (both corner modes) and nearest resampling to odd sizes."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_in, 4, 3, padding=1) for c_in in (3, 4, 4, 4))

    def forward(self, x):
        y = self.convs[0](x)
        y = y - y.mean(dim=(2, 3), keepdim=True)  # global: the prefix ends here
        y = self.convs[1](F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False))
        y = self.convs[2](F.interpolate(y, size=(37, 53), mode="bilinear", align_corners=True))
        y = F.interpolate(F.interpolate(y, scale_factor=2, mode="nearest"), size=(101, 90), mode="nearest")
        return self.convs[3](y)


@pytest.mark.parametrize("grid", [(2, 2), (3, 4)])
def test_tail_with_resampling_equals_untiled(grid):
    net = ResamplingTail().eval()
    x = torch.randn(1, 3, 32, 48)
    tiled = TiledInference(net, x.shape, grid, max_stride=None)
    assert "tail" in tiled.plan.segments and len(tiled.plan.segments["tail"].nodes) == 7
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), net(x), atol=1e-5, rtol=0)


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
    expected, actual, tiled = _untiled_and_tiled(SMP_UNET, (1, 3, 64, 64), (1, 1), max_stride=4)
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
    # the head after global pooling works on 1x1 maps: never a tail to tile, whatever max_stride says
    assert list(TiledInference(net, x.shape, (4, 4), max_stride=None).plan.segments) == ["prefix"]
    assert tiled_plan.fp32.planned < untiled_plan.fp32.planned / 4
    assert measured_peak_bytes(tiled, x) < measured_peak_bytes(net, x) / 4


@pytest.mark.slow
def test_tiled_model_exports_to_the_lite_interpreter_and_executorch(tmp_path):
    net = build_network(TV_LRASPP, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 80)
    tiled = LogitsOnly(TiledInference(net, x.shape, (2, 2)))
    info = export_torchscript_lite(tiled, x, tmp_path / "tiled.ptl")
    with torch.no_grad():
        torch.testing.assert_close(load_lite(info["path"])(x), net(x)["out"], atol=1e-4, rtol=0)
    if executorch_available()[0]:  # a small tiled net: lowering a tiled LR-ASPP takes a minute
        small = TiledInference(WideStem().eval(), (1, 3, 32, 32), (2, 2))
        settings = BenchmarkSettings(input_shape=(1, 3, 32, 32), runtimes=("executorch",), warmup=0, runs=1,
                                     isolate=False, memory=False)
        entry = benchmark_network(small, settings, tmp_path)["runtimes"]["executorch"]
        assert entry["status"] == "ok" and entry["max_abs_diff"] <= 1e-4, entry


class GlobalFirst(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=(2, 3), keepdim=True)


def test_refusals_name_the_cause():
    deeplab = build_network(DEEPLAB_LARGE, num_classes=3)
    with pytest.raises(TilingError, match=r"Cannot tile up to 'encoder.model.blocks.3'.*encoder.model.blocks.2.0.se"):
        TiledInference(deeplab, (1, 3, 64, 64), (2, 2), split_after="encoder.model.blocks.3")
    with pytest.raises(TilingError, match="names no module"):
        TiledInference(deeplab, (1, 3, 64, 64), (2, 2), split_after="encoder.no_such_layer")
    with pytest.raises(TilingError, match="finer than the tiled output"):
        TiledInference(deeplab, (1, 3, 64, 64), (16, 16))
    with pytest.raises(TilingError, match="Nothing to tile"):
        TiledInference(GlobalFirst(), (1, 3, 16, 16), (2, 2))
    with pytest.raises(TilingError, match="grid must be"):
        TiledInference(deeplab, (1, 3, 64, 64), (0, 2))
    tiled = TiledInference(deeplab, (1, 3, 64, 64), (2, 2))
    with pytest.raises(TilingError, match=r"built for inputs \[1, 3, 64, 64\], got \[1, 3, 96, 64\]"):
        tiled(torch.randn(1, 3, 96, 64))
    assert deeplab.training, "building a tiled program leaves the user's network in its mode"
