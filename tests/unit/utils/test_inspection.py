import pytest
import torch
from torch import nn

from lightning_segcompress.models import SegmentationModule, build_network
from lightning_segcompress.utils import (
    count_macs,
    count_params,
    example_input,
    extract_logits,
    find_classifier_layers,
    find_network,
    match_module_names,
    model_stats,
)
from support.common import SMP_DEEPLAB, SMP_UNET, TV_LRASPP

X = torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize(
    "spec, expected",
    [
        (SMP_DEEPLAB, ["segmentation_head.0"]),
        (SMP_UNET, ["segmentation_head.0"]),
        (TV_LRASPP, ["classifier.high_classifier", "classifier.low_classifier"]),
        (
            {"class_path": "torchvision.models.segmentation.deeplabv3_mobilenet_v3_large",
             "init_args": {"aux_loss": True}},
            ["aux_classifier.4", "classifier.4"],
        ),
    ],
)
def test_find_classifier_layers(spec, expected):
    net = build_network(spec, num_classes=5)
    found = find_classifier_layers(net, X)
    assert sorted(found) == sorted(expected)
    modules = dict(net.named_modules())
    assert all(modules[name].out_channels == 5 for name in found)


def test_find_classifier_layers_with_frozen_weights_and_linear_head():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net.requires_grad_(False)
    assert find_classifier_layers(net, X) == ["4"]
    assert not any(p.requires_grad for p in net.parameters()), "frozen state must be restored"


def test_params_and_macs_smp_and_torchvision():
    conv = nn.Conv2d(3, 4, 1, bias=False)
    assert count_params(conv) == 12
    assert count_macs(conv, X) == 12 * 64 * 64

    for spec in (SMP_DEEPLAB, TV_LRASPP):
        net = build_network(spec, num_classes=5)
        stats = model_stats(net, X)
        assert stats.params == sum(p.numel() for p in net.parameters())
        assert stats.macs > stats.params  # convolutions reuse each weight at many positions
        assert model_stats(net, torch.randn(1, 3, 128, 128)).macs == pytest.approx(4 * stats.macs, rel=0.05)
        assert net.training, "counting must not change the model's mode"


def test_count_params_trainable_only():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    net[0].requires_grad_(False)
    assert count_params(net, trainable_only=True) == 4 * 2 + 2


def test_find_network_in_lightning_module():
    module = SegmentationModule(network=SMP_DEEPLAB, num_classes=3)
    assert find_network(module) is module.net
    assert find_network(module, "net.encoder") is module.net.encoder


def test_find_network_in_user_module_and_errors():
    class UserModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = nn.Conv2d(3, 2, 1)
            self.loss_fn = nn.CrossEntropyLoss()

    assert isinstance(find_network(UserModule()), nn.Conv2d)

    class TwoNets(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = nn.Conv2d(3, 2, 1)
            self.teacher = nn.Conv2d(3, 2, 1)

    with pytest.raises(ValueError, match="network_attribute"):
        find_network(TwoNets())
    with pytest.raises(AttributeError, match="'missing'"):
        find_network(TwoNets(), "missing")


def test_example_input_from_shape_and_batches():
    net = build_network(SMP_UNET, num_classes=3)
    x = example_input(net, size=(32, 48), batch_size=2)
    assert x.shape == (2, 3, 32, 48) and x.dtype == torch.float32
    assert torch.equal(x, example_input(net, size=(32, 48), batch_size=2)), "deterministic"
    images = torch.rand(4, 3, 16, 16)
    assert torch.equal(example_input(net, reference=(images, None), batch_size=2), images[:2])
    assert torch.equal(example_input(net, reference={"image": images}), images[:1])
    with pytest.raises(TypeError, match="image tensor"):
        example_input(net, reference="not a batch")


def test_extract_logits():
    t = torch.zeros(1, 2, 4, 4)
    assert extract_logits(t) is t
    assert extract_logits({"out": t, "aux": t + 1}) is t
    assert extract_logits((t, t + 1)) is t
    with pytest.raises(TypeError, match="'out'"):
        extract_logits({"logits": t})


def test_match_module_names():
    net = build_network(SMP_UNET, num_classes=3)
    matched = match_module_names(net, ["segmentation_head.0", r"decoder\.blocks\.\d+\.conv1\.0", "nope.*"])
    assert matched["segmentation_head.0"] == ["segmentation_head.0"]
    assert len(matched[r"decoder\.blocks\.\d+\.conv1\.0"]) == 3
    assert matched["nope.*"] == []
    with pytest.raises(ValueError, match="valid regex"):
        match_module_names(net, ["("])


def test_count_macs_of_a_traced_graph_whose_convolutions_are_ops():
    """A PT2E int8 graph has no conv modules: its MACs come from torch's FLOP counter, not 0."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 4, 1, bias=False)).eval()
    x = torch.randn(1, 3, 16, 16)
    graph = torch.export.export(net, (x,)).module()
    assert not any(isinstance(m, nn.Conv2d) for m in graph.modules())
    assert count_macs(graph, x) == count_macs(net, x) == 16 * 16 * (8 * 3 * 9 + 4 * 8)
