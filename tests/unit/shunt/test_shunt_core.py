import pytest
import torch
from torch import nn

from lightning_segcompress.models import build_network
from lightning_segcompress.shunt import (
    Shunt,
    ShuntError,
    block_map,
    knowledge_quotients,
    miou_evaluator,
    plan_shunt,
    resolve_range,
    select_range,
    splice,
)
from lightning_segcompress.shunt.surgery import modules_before
from lightning_segcompress.state import get_stages, restore_from_checkpoint
from lightning_segcompress.utils import count_params
from support.common import SMP_DEEPLAB, SMP_UNET, TV_LRASPP

SMP_DEEPLAB_LARGE = {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                     "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}}
SMP_UNET_MNV3 = {"class_path": "segmentation_models_pytorch.Unet",
                 "init_args": {"encoder_name": "tu-mobilenetv3_small_100", "decoder_channels": [32, 16, 8, 8, 8]}}
X = torch.randn(1, 3, 64, 64)


def _net(spec):
    torch.manual_seed(0)
    return build_network(spec, num_classes=3).eval()


def _logits(net, x=X):
    out = net(x)
    return out["out"] if isinstance(out, dict) else out


def test_block_map_smp_deeplab_and_unet_taps():
    blocks = block_map(_net(SMP_DEEPLAB), X)
    assert [b.name for b in blocks][:2] == ["encoder.model.blocks.0.0", "encoder.model.blocks.1.0"]
    assert len(blocks) == 12
    by_name = {b.name: b for b in blocks}
    # DeepLabV3+ reads the stride-4 feature and the last one; the other smp features are measured as unused
    assert {b.name for b in blocks if b.feeds_decoder} == {"encoder.model.blocks.0.0", "encoder.model.blocks.5.0"}
    assert by_name["encoder.model.blocks.1.0"].stride == 2 and not by_name["encoder.model.blocks.1.0"].residual
    assert by_name["encoder.model.blocks.1.1"].residual
    assert by_name["encoder.model.blocks.4.1"].dilation == 2  # output stride 16
    assert by_name["encoder.model.blocks.2.0"].in_shape == (24, 8, 8)
    assert by_name["encoder.model.blocks.2.0"].out_shape == (40, 4, 4)
    assert by_name["encoder.model.blocks.2.1"].params == count_params(_net(SMP_DEEPLAB).get_submodule(
        "encoder.model.blocks.2.1"))
    unet = block_map(_net(SMP_UNET_MNV3), X)
    assert {b.name for b in unet if b.feeds_decoder} == {
        "encoder.model.blocks.0.0", "encoder.model.blocks.1.1", "encoder.model.blocks.3.1", "encoder.model.blocks.5.0"}


def test_block_map_torchvision_lraspp():
    blocks = block_map(_net(TV_LRASPP), X)
    assert [b.name for b in blocks] == [f"backbone.{i}" for i in range(1, 16)]
    assert {b.name for b in blocks if b.feeds_decoder} == {"backbone.4", "backbone.15"}
    assert [b.residual for b in blocks[:3]] == [True, False, True]
    assert blocks[13].dilation == 2


def test_unsupported_backbone_is_refused():
    with pytest.raises(ShuntError, match="no supported MobileNetV3 backbone.*tu-mobilenetv3_large_100"):
        block_map(_net(SMP_UNET), X)


@pytest.mark.parametrize("spec", [SMP_DEEPLAB, TV_LRASPP], ids=["smp", "torchvision"])
def test_knowledge_quotients_follow_the_formula_and_restore_the_network(spec):
    net = _net(spec)
    blocks = block_map(net, X)
    reference = _logits(net)
    removed_seen = []

    def evaluate(network):  # 0.8 for the full network, 0.2 less for each block that is an identity
        missing = [b.name for b in blocks if isinstance(network.get_submodule(b.name), nn.Identity)]
        removed_seen.append(missing)
        return 0.8 - 0.2 * len(missing)

    quotients = knowledge_quotients(net, blocks, evaluate)
    residual = [b.name for b in blocks if b.residual]
    assert sorted(quotients) == sorted(residual)
    assert all(q == pytest.approx(1 - 0.6 / 0.8) for q in quotients.values())
    assert removed_seen[1:] == [[name] for name in residual]  # one block at a time
    assert torch.equal(_logits(net), reference), "every block is put back"


def test_knowledge_quotients_with_real_miou():
    net = _net(TV_LRASPP).train()
    with torch.no_grad():  # BN statistics of real activations, so that predictions vary with the input
        for _ in range(3):
            net(torch.randn(4, 3, 64, 64))
    net.eval()
    blocks = block_map(net, X)
    images = torch.randn(2, 3, 64, 64)
    masks = _logits(net, images).argmax(1)  # the network scores mIoU 1 on its own predictions
    evaluate = miou_evaluator([(images, masks)], num_classes=3)
    assert evaluate(net) == pytest.approx(1.0)
    quotients = knowledge_quotients(net, blocks, evaluate)
    assert all(0.0 <= q <= 1.0 for q in quotients.values())
    assert max(quotients.values()) > 0  # removing some block changes the predictions
    with pytest.raises(ShuntError, match="train it first"):
        knowledge_quotients(net, blocks, lambda network: 0.0)


def test_auto_selection_meets_the_target_with_the_lowest_kq():
    net = _net(SMP_DEEPLAB_LARGE)
    blocks = block_map(net, X)
    totals = {"params": count_params(net), "macs": 1}
    quotients = {b.name: 0.01 for b in blocks if b.residual}
    quotients["encoder.model.blocks.5.1"] = 0.5  # the obvious big candidates are costly
    quotients["encoder.model.blocks.5.2"] = 0.5
    plan = select_range(blocks, quotients, {"params": 0.1}, totals)
    assert plan.params_removed >= 0.1 * totals["params"]
    assert not {"encoder.model.blocks.5.1", "encoder.model.blocks.5.2"} & set(plan.names)
    cheap = select_range(blocks, {}, {"params": 0.1}, totals)
    assert len(cheap.names) == 1  # with no cost the shortest sufficient range wins
    with pytest.raises(ShuntError, match="Lower the target"):
        select_range(blocks, quotients, {"params": 0.9}, totals)


@pytest.mark.parametrize("first, last, downsamples, dilations", [
    (13, 14, 0, (2, 2)),  # inside the dilated stage
    (11, 13, 0, (1, 2)),  # into it: first depthwise undilated, last dilated
    (4, 7, 1, (1, 1)),
    (3, 7, 2, (1, 1)),
])
def test_shunt_matches_the_range_for_downsamples_and_dilations(first, last, downsamples, dilations):
    net = _net(SMP_DEEPLAB_LARGE)
    blocks = block_map(net, X)
    plan = plan_shunt(resolve_range(blocks, first, last))
    strides = [u["stride"] for u in plan.config["units"]]
    assert strides == [2] * downsamples + [1] * (2 - downsamples)
    kept = [u["dilation"] for u in plan.config["units"][downsamples:]]
    assert kept == [dilations[0], dilations[1]][downsamples:]
    assert plan.config["in_channels"] == blocks[first].in_shape[0]
    shunt = Shunt(plan.config).eval()
    odd = torch.randn(1, 3, 80, 112)  # not square, odd sizes (5, 7) at stride 16
    captured = {}
    net.get_submodule(plan.names[0]).register_forward_pre_hook(lambda m, i: captured.__setitem__("in", i[0]))
    net.get_submodule(plan.names[-1]).register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    reference = _logits(net, odd)
    assert shunt(captured["in"]).shape == captured["out"].shape
    before = count_params(net)
    splice(net, plan.names, shunt)
    assert _logits(net, odd).shape == reference.shape
    assert count_params(net) == before - plan.params_removed


def test_three_downsamples_need_the_three_block_variant():
    # torchvision DeepLabV3 without its auxiliary head reads only the last feature: no tap inside the range
    spec = {"class_path": "torchvision.models.segmentation.deeplabv3_mobilenet_v3_large",
            "init_args": {"aux_loss": False}}
    blocks = block_map(_net(spec), X)
    with pytest.raises(ShuntError, match="at most 2 times.*'three_blocks'"):
        plan_shunt(resolve_range(blocks, "backbone.1", "backbone.7"))
    plan = plan_shunt(resolve_range(blocks, "backbone.1", "backbone.7"), variant="three_blocks")
    assert [u["stride"] for u in plan.config["units"]] == [2, 2, 2]


def test_ranges_that_remove_a_skip_connection_are_refused():
    blocks = block_map(_net(TV_LRASPP), X)
    with pytest.raises(ShuntError, match=r"block 3 \(backbone.4\) feeds the decoder"):
        plan_shunt(resolve_range(blocks, 2, 5))
    assert plan_shunt(resolve_range(blocks, 2, 3)).names == ["backbone.3", "backbone.4"]  # ends at the tap: fine
    with pytest.raises(ShuntError, match="no block 99"):
        resolve_range(blocks, 5, 99)


def test_spliced_network_restores_from_plain_data():
    net = _net(TV_LRASPP)
    plan = plan_shunt(resolve_range(block_map(net, X), "backbone.8", "backbone.10"))
    splice(net, plan.names, Shunt(plan.config))
    checkpoint = {"segcompress": {"version": 1, "network_attribute": "", "stages": get_stages(net)},
                  "state_dict": net.state_dict()}
    fresh = restore_from_checkpoint(_net(TV_LRASPP), checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(_logits(fresh.eval()), _logits(net))
    assert isinstance(fresh.get_submodule("backbone.9"), nn.Identity)
    assert modules_before(net, "backbone.8", X)[:2] == ["backbone.0.0", "backbone.0.1"]


def test_negative_quotients_do_not_pull_in_longer_ranges():
    net = _net(SMP_DEEPLAB_LARGE)
    blocks = block_map(net, X)
    totals = {"params": count_params(net), "macs": 1}
    noise = {b.name: -0.01 for b in blocks if b.residual}  # every block "helps" when removed
    plan = select_range(blocks, noise, {"params": 0.1}, totals)
    assert len(plan.names) == 1 and plan.params_removed < 0.2 * totals["params"]
