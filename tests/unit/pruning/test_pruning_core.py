"""Pure-torch pruning core: schedules, importances, target search, atomic replay, plain-data restore."""

import copy

import pytest
import torch
from torch import nn

from lightning_segcompress import load_compressed
from lightning_segcompress.models import build_network
from lightning_segcompress.pruning import (
    PruningConfig,
    PruningError,
    PruningSchedule,
    build_importance,
    layer_widths,
    measure,
    plan_step,
    prune_with_history,
    pruning_history,
    replay_history,
)
from lightning_segcompress.pruning.floors import floor_width, layer_floors, protect_floors
from lightning_segcompress.pruning.graph import build_graph
from lightning_segcompress.pruning.importance import compute_group_scores
from lightning_segcompress.state import write_to_checkpoint
from lightning_segcompress.utils.inspection import example_input, find_classifier_layers, output_tensors
from support.common import SMP_DEEPLAB, SMP_UNET, TV_LRASPP


def _setup(spec, classes=4, size=64):
    torch.manual_seed(0)
    net = build_network(spec, num_classes=classes).eval()
    x = example_input(net, size)
    return net, x, find_classifier_layers(net, x)


# ---- schedules -----------------------------------------------------------------------------------------

def test_schedule_step_epochs_and_fractions():
    agp = PruningSchedule("agp", amount=0.5, start_epoch=2, end_epoch=9, steps=4)
    assert agp.step_epochs() == [2, 4, 6, 8]
    fractions = [agp.fraction_after(k) for k in range(1, 5)]
    assert fractions[-1] == pytest.approx(0.5)
    assert fractions[0] == pytest.approx(0.5 * (1 - 0.75**3))
    cuts = [b - a for a, b in zip([0.0] + fractions, fractions)]
    assert cuts == sorted(cuts, reverse=True)  # AGP prunes most early
    linear = PruningSchedule("linear", amount=0.6, start_epoch=0, end_epoch=3, steps=3)
    assert linear.step_epochs() == [0, 1, 2]
    assert [linear.fraction_after(k) for k in (1, 2, 3)] == pytest.approx([0.2, 0.4, 0.6])
    assert PruningSchedule("one_shot", amount=0.3, start_epoch=5).step_epochs() == [5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="agp", amount=1.0), "amount must be a fraction in \\(0, 1\\)"),
    (dict(kind="agp", amount=0.0), "amount must be a fraction"),
    (dict(kind="cubic", amount=0.5), "schedule must be one of"),
    (dict(kind="linear", amount=0.5, start_epoch=0, end_epoch=2, steps=3), "3 steps need at least 3 epochs"),
    (dict(kind="one_shot", amount=0.5, steps=2), "one_shot schedule prunes once"),
])
def test_schedule_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningSchedule(**kwargs)


# ---- importances and targets ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SMP_DEEPLAB, TV_LRASPP], ids=["smp-deeplabv3plus", "tv-lraspp"])
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor", "random"])
def test_each_importance_hits_the_macs_target(spec, importance):
    net, x, classifiers = _setup(spec)
    if importance == "taylor":  # gradients from one batch, as the callback accumulates them
        out = output_tensors(net(torch.randn(2, 3, 64, 64)))
        sum(o.square().mean() for o in out).backward()
    reference = measure(net, x)
    plan = plan_step(net, x, build_importance(importance), "macs", 0.5, reference["macs"],
                     PruningConfig(ignored_layers=classifiers))
    assert plan.within_tolerance, plan.as_dict()
    assert measure(net, x) == reference  # planning never touches the network
    pruned = copy.deepcopy(net)
    prune_with_history(pruned, plan.history, x)
    achieved = 1 - measure(pruned, x)["macs"] / reference["macs"]
    assert achieved == pytest.approx(0.5, rel=0.03)
    assert [t.shape for t in output_tensors(pruned(x))] == [t.shape for t in output_tensors(net(x))]


@pytest.mark.parametrize("metric", ["params", "channels"])
def test_params_and_channels_targets(metric):
    net, x, classifiers = _setup(SMP_DEEPLAB)
    reference = measure(net, x)
    plan = plan_step(net, x, build_importance("l2"), metric, 0.4, reference[metric],
                     PruningConfig(ignored_layers=classifiers))
    pruned = copy.deepcopy(net)
    prune_with_history(pruned, plan.history, x)
    assert 1 - measure(pruned, x)[metric] / reference[metric] == pytest.approx(0.4, rel=0.03)


def test_round_to_keeps_pruned_layers_multiples_of_eight_and_protects_classifier_and_ignored():
    net, x, classifiers = _setup(SMP_DEEPLAB)
    before = layer_widths(net)
    ignored = classifiers + ["decoder.aspp.0.convs.0.0"]
    plan = plan_step(net, x, build_importance("l1"), "macs", 0.5, measure(net, x)["macs"],
                     PruningConfig(ignored_layers=ignored, round_to=8))
    prune_with_history(net, plan.history, x)
    after = layer_widths(net)
    changed = [name for name in before if after[name] != before[name]]
    assert changed
    assert all(after[name] % 8 == 0 for name in changed if before[name] % 8 == 0)
    for name in ignored:
        assert after[name] == before[name]


def test_bn_scale_prunes_the_smallest_gammas():
    net, x, classifiers = _setup(SMP_UNET)
    bn = net.decoder.blocks[0].conv1[1]
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.weight[:8] = 1e-4  # the first 8 channels of this layer are "dead"
    conv = net.decoder.blocks[0].conv1[0]
    plan = plan_step(net, x, build_importance("bn_scale"), "channels", 0.02, measure(net, x)["channels"],
                     PruningConfig(ignored_layers=classifiers, round_to=None, tolerance=0.5))
    prune_with_history(net, plan.history, x)
    assert conv.out_channels == 32 - 8
    assert torch.all(bn.weight == 1.0)  # exactly the dead channels went


def _net_with_a_dead_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # "3": 28 gammas ~0
                        nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 4, 1)).eval()
    with torch.no_grad():
        net[4].weight.fill_(1e-4)
        net[4].weight[:4] = 1.0
    return net, torch.randn(1, 3, 16, 16)


def test_a_global_step_never_cuts_a_layer_below_its_floor_of_the_reference_width():
    net, x = _net_with_a_dead_layer()
    reference, original = measure(net, x)["channels"], layer_widths(net)
    config = PruningConfig(ignored_layers=["9"], round_to=None, max_layer_fraction=0.75, tolerance=0.05,
                           reference_widths=original)
    # the global threshold would take 28 channels of the dead layer; a quarter of its 32 must stay
    plan = plan_step(net, x, build_importance("bn_scale"), "channels", 0.45, reference, config)
    prune_with_history(net, plan.history, x)
    assert net[3].out_channels == 8
    assert plan.within_tolerance
    # the floor is a quarter of the *reference* width: a second step cannot compound it to a quarter of 8
    plan = plan_step(net, x, build_importance("bn_scale"), "channels", 0.5, reference, config)
    prune_with_history(net, plan.history, x)
    assert net[3].out_channels == 8
    assert min(layer_widths(net)[n] / original[n] for n in ("0", "3", "6")) >= 0.25
    # without reference widths the floor is relative to the network the step is given: the 4 dead ones left go
    relative = PruningConfig(ignored_layers=["9"], round_to=None, max_layer_fraction=0.75, tolerance=0.05)
    plan = plan_step(net, x, build_importance("bn_scale"), "channels", 0.6, reference, relative)
    prune_with_history(net, plan.history, x)
    assert net[3].out_channels == 4


def test_floor_is_rounded_up_to_round_to():
    net, x = _net_with_a_dead_layer()
    config = PruningConfig(ignored_layers=["9"], round_to=8, max_layer_fraction=0.9, tolerance=0.9)
    plan = plan_step(net, x, build_importance("bn_scale"), "channels", 0.5, measure(net, x)["channels"], config)
    prune_with_history(net, plan.history, x)
    assert net[3].out_channels == 8  # 10 % of 32 is 4 channels, kept as one multiple of 8


class _Concat(nn.Module):
    """Two branches joined by torch.cat and a depthwise convolution (as in DeepLabV3+'s decoder): the channels
    of both branches form one group, rooted at the depthwise convolution."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.narrow = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48), nn.ReLU(),
                                  nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        return self.fuse(torch.cat([self.wide(x), self.narrow(x)], dim=1))


def test_the_floor_holds_for_each_layer_joined_by_a_concatenation():
    torch.manual_seed(0)
    net, x = _Concat().eval(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        net.wide[1].weight.fill_(1e-4)  # the whole wide branch looks dead: global ranking takes it first
    reference, original = measure(net, x)["channels"], layer_widths(net)
    config = PruningConfig(ignored_layers=["fuse.6"], round_to=None, max_layer_fraction=0.75, tolerance=0.05,
                           reference_widths=original)
    for fraction in (0.5, 0.65):  # two steps: the second must not cut the wide branch below a quarter of 32
        plan = plan_step(net, x, build_importance("bn_scale"), "channels", fraction, reference, config)
        prune_with_history(net, plan.history, x)
        assert net.wide[0].out_channels == 8  # its floor, although the group's root (the depthwise conv) has more
    assert min(layer_widths(net)[n] / original[n] for n in original) >= 0.25


def test_floors_follow_each_branch_of_a_concatenation_into_the_group():
    net, x = _Concat().eval(), torch.randn(1, 3, 16, 16)
    graph = build_graph(net, x)
    scores = compute_group_scores(graph, build_importance("l2"), [net.fuse[6]], set())
    floors = layer_floors(graph, scores, [net.fuse[6]], max_layer_fraction=0.75, round_to=None)
    assert floors["wide.0"] == (8, ("fuse.0:out", list(range(32))))
    assert floors["narrow.0"] == (4, ("fuse.0:out", list(range(32, 48))))
    assert floors["fuse.0"] == (12, ("fuse.0:out", list(range(48))))
    assert floor_width(26, 0.9, 8) == 8 and floor_width(256, 0.9, 8) == 32 and floor_width(5, 0.9, None) == 1


def test_protected_channels_per_group_are_a_multiple_of_round_to():
    """torch-pruning rounds what a group keeps down to round_to: 5 + 3 protected channels of a concatenation
    group would lose one to rounding, so the group's next best channel is protected too."""
    scores = {"g:out": [float(v) for v in range(12)], "h:out": [0.5, 0.25]}
    floors = {"a": (5, ("g:out", list(range(8)))), "b": (2, ("g:out", [8, 9, 10, 11])), "c": (1, ("h:out", [0, 1]))}
    protected = protect_floors(scores, floors, round_to=8)
    lifted = [p for p, (before, after) in enumerate(zip(scores["g:out"], protected["g:out"])) if after > before]
    assert lifted == [3, 4, 5, 6, 7, 9, 10, 11]  # best 5 of a, best 2 of b, then the best channel left (9)
    assert protected["h:out"][0] > max(scores["g:out"]) and protected["h:out"][1] > max(scores["g:out"])  # all of h


def test_unknown_importance_names_the_choices():
    with pytest.raises(ValueError, match="use one of \\['l1', 'l2', 'bn_scale', 'taylor', 'random'\\]"):
        build_importance("magnitude")


# ---- replay, rollback and restore ----------------------------------------------------------------------

def test_history_replays_identically_on_a_fresh_network():
    net, x, classifiers = _setup(TV_LRASPP)
    plan = plan_step(net, x, build_importance("l2"), "macs", 0.3, measure(net, x)["macs"],
                     PruningConfig(ignored_layers=classifiers))
    prune_with_history(net, plan.history, x)
    fresh = build_network(TV_LRASPP, num_classes=4).eval()
    replay_history(fresh, pruning_history(net), x)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh(x)["out"], net(x)["out"])


def test_load_compressed_restores_a_bare_network_with_weights_only(tmp_path):
    net, x, classifiers = _setup(SMP_UNET)
    plan = plan_step(net, x, build_importance("l1"), "params", 0.3, measure(net, x)["params"],
                     PruningConfig(ignored_layers=classifiers, round_to=None))
    prune_with_history(net, plan.history, x)
    checkpoint = {"state_dict": net.state_dict()}
    write_to_checkpoint(checkpoint, net, "")
    torch.save(checkpoint, tmp_path / "pruned.pt")
    restored = load_compressed(build_network(SMP_UNET, num_classes=4).eval(), tmp_path / "pruned.pt")
    assert torch.equal(restored(x), net(x))
    with pytest.raises(RuntimeError, match="size mismatch"):  # what users hit without the plan
        build_network(SMP_UNET, num_classes=4).load_state_dict(net.state_dict())


class _Scale(nn.Module):
    """A layer with its own per-channel parameter that torch-pruning has no pruner for."""

    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return x * self.gamma


def _net_with_custom_layer():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), _Scale(16),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))


def test_unsupported_layer_is_refused_with_its_name_and_the_fix():
    net = _net_with_custom_layer()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(PruningError, match=r"no pruner for layer\(s\) '3' \(_Scale\).*ignored_layers"):
        plan_step(net, x, build_importance("l1"), "channels", 0.3, measure(net, x)["channels"],
                  PruningConfig(ignored_layers=["6"], round_to=None))


def test_ignoring_the_unsupported_layer_keeps_its_channels():
    net = _net_with_custom_layer()
    x = torch.randn(1, 3, 16, 16)
    plan = plan_step(net, x, build_importance("l1"), "channels", 0.1, measure(net, x)["channels"],
                     PruningConfig(ignored_layers=["6"], protected_layers=["3"], round_to=None, tolerance=0.9))
    prune_with_history(net, plan.history, x)
    assert net[0].out_channels == 16 and net[3].gamma.shape[1] == 16
    assert net[4].out_channels < 16


def test_failed_replay_restores_the_network_exactly():
    net, x, classifiers = _setup(SMP_DEEPLAB)
    plan = plan_step(net, x, build_importance("l2"), "macs", 0.3, measure(net, x)["macs"],
                     PruningConfig(ignored_layers=classifiers))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    widths = layer_widths(net)
    broken = plan.history + [["no.such.layer", True, [0]]]
    with pytest.raises(PruningError, match="'no.such.layer'"):
        prune_with_history(net, broken, x)
    assert layer_widths(net) == widths
    assert [id(p) for p in net.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert pruning_history(net) == []


def test_pruning_keeps_frozen_parameters_frozen():
    net, x, classifiers = _setup(SMP_DEEPLAB)
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    plan = plan_step(net, x, build_importance("l1"), "macs", 0.4, measure(net, x)["macs"],
                     PruningConfig(ignored_layers=classifiers))
    prune_with_history(net, plan.history, x)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.decoder.parameters())
