import math

import pytest
import torch

from conftest import SMP_UNET
from lightning_segcompress.models import build_network
from lightning_segcompress.pruning import PruningConfig, build_importance, measure, plan_step
from lightning_segcompress.pruning.graph import build_graph
from lightning_segcompress.pruning.importance import compute_group_scores
from lightning_segcompress.pruning.latency import GroupCost, KeepBest, latency_group_weights, weights_from_costs
from lightning_segcompress.utils.inspection import example_input, find_classifier_layers


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    network = build_network(SMP_UNET, num_classes=3)
    example = example_input(network, size=64)
    return network, example, find_classifier_layers(network, example)


def test_weights_cover_every_prunable_group(unet):
    network, example, classifier = unet
    before = {k: v.clone() for k, v in network.state_dict().items()}
    network.train()
    weights = latency_group_weights(network, example, classifier, threads=1, runs=1)
    modules = dict(network.named_modules())
    groups = compute_group_scores(build_graph(network, example), build_importance("l2"),
                                  [modules[n] for n in classifier], set())
    assert set(weights) == set(groups)
    assert all(math.isfinite(w) and 0.5 <= w <= 2.0 for w in weights.values())
    assert network.training
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_plan_with_latency_weights_hits_the_macs_target(unet):
    network, example, classifier = unet
    # weights in latency_group_weights' range, but fixed: measured ones change from run to run (timing noise)
    groups = latency_group_weights(network, example, classifier, threads=1, runs=1)
    weights = {group: (0.5, 0.8, 1.25, 2.0)[i % 4] for i, group in enumerate(sorted(groups))}
    reference = measure(network, example, ["macs"])["macs"]
    config = PruningConfig(ignored_layers=classifier, round_to=8)
    importance = KeepBest(build_importance("l2"), min_channels=8)
    plan = plan_step(network, example, importance, "macs", 0.5, reference, config, group_weights=weights)
    assert plan.history
    assert plan.within_tolerance, plan.as_dict()


def test_keep_best_lifts_each_groups_best_channels_above_the_rest():
    keep = KeepBest(lambda group: torch.tensor([0.9, 1.1, 1.0, 0.95]), keep_fraction=0.25, min_channels=2)
    scores = keep(None)
    assert scores[1] > 100 and scores[2] > 100
    assert torch.allclose(scores[[0, 3]], torch.tensor([0.9, 0.95], dtype=torch.float64))


def test_groups_that_buy_more_time_per_mac_get_cheaper():
    costs = {
        "slow:out": GroupCost(channels=16, removed=8, saved_ms=4.0, saved_macs=1e9),
        "fast:out": GroupCost(channels=16, removed=8, saved_ms=1.0, saved_macs=1e9),
        "flat:out": GroupCost(channels=16, removed=8, saved_ms=-0.1, saved_macs=1e9),
    }
    weights = weights_from_costs(costs, strength=1.0, bounds=(0.1, 10.0))
    assert weights["slow:out"] < 1.0 < weights["fast:out"]
    assert weights["flat:out"] == 10.0  # removing it saves no time at all
    assert weights_from_costs({"a:out": GroupCost(8, 4, 0.0, 0.0)}) == {"a:out": 1.0}
