import pytest
import torch
from torch import nn

from lightning_segcompress.models import build_network


def test_builds_smp_class_and_torchvision_builder_with_num_classes_filled_in():
    unet = build_network({"class_path": "segmentation_models_pytorch.Unet",
                          "init_args": {"encoder_name": "resnet18", "encoder_depth": 3,
                                        "decoder_channels": [16, 8, 8]}}, num_classes=7)
    assert unet(torch.randn(1, 3, 32, 32)).shape == (1, 7, 32, 32)
    lraspp = build_network({"class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"},
                           num_classes=4)
    assert lraspp(torch.randn(1, 3, 32, 32))["out"].shape == (1, 4, 32, 32)


def test_plain_module_without_class_argument():
    net = build_network({"class_path": "torch.nn.Conv2d",
                         "init_args": {"in_channels": 3, "out_channels": 2, "kernel_size": 1}}, num_classes=2)
    assert isinstance(net, nn.Conv2d)


def test_spec_is_not_mutated():
    spec = {"class_path": "segmentation_models_pytorch.FPN", "init_args": {"encoder_name": "resnet18"}}
    build_network(spec, num_classes=3)
    assert spec == {"class_path": "segmentation_models_pytorch.FPN", "init_args": {"encoder_name": "resnet18"}}


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ({"init_args": {}}, ValueError, "class_path"),
        ({"class_path": "Unet"}, ValueError, "dotted path"),
        ({"class_path": "no_such_package.Net"}, ImportError, "no_such_package"),
        ({"class_path": "segmentation_models_pytorch.NoSuchNet"}, ImportError, "NoSuchNet"),
        ({"class_path": "torch.nn.Conv2d", "args": {}}, ValueError, "unknown keys"),
        ({"class_path": "segmentation_models_pytorch.Unet", "init_args": {"classes": 3}}, ValueError,
         "classes=3 but num_classes=5"),
        ({"class_path": "builtins.dict", "init_args": {}}, TypeError, "not an nn.Module"),
        ({"class_path": "torch.nn.Conv2d", "init_args": {"in_chans": 3}}, TypeError, "Cannot build torch.nn.Conv2d"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        build_network(spec, num_classes=5)
