"""benchmarks/_eager_group_costs.py: the eager per-group profiler behind pruning_speedup.py's latency-aware row."""

import importlib.util
import math

import torch

from lightning_segcompress.models import build_network
from lightning_segcompress.pruning import build_importance
from lightning_segcompress.pruning.graph import build_graph
from lightning_segcompress.pruning.importance import compute_group_scores
from lightning_segcompress.utils.inspection import example_input, find_classifier_layers
from support.common import REPO, SMP_UNET


def _eager_group_costs():
    spec = importlib.util.spec_from_file_location("eager_group_costs", REPO / "benchmarks" / "_eager_group_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weights_cover_every_prunable_group_and_leave_the_network_alone():
    torch.manual_seed(0)
    network = build_network(SMP_UNET, num_classes=3)
    example = example_input(network, size=64)
    classifier = find_classifier_layers(network, example)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    network.train()
    weights = _eager_group_costs().latency_group_weights(network, example, classifier, threads=1, runs=1)
    modules = dict(network.named_modules())
    groups = compute_group_scores(build_graph(network, example), build_importance("l2"),
                                  [modules[n] for n in classifier], set())
    assert set(weights) == set(groups)
    assert all(math.isfinite(w) for w in weights.values())
    assert len(set(weights.values())) > 1, "measured per group, not one constant"
    assert network.training
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
