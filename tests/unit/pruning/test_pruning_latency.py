import copy
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule
from lightning_segcompress.benchmark import executorch_runtime
from lightning_segcompress.callbacks import StructuredPruning
from lightning_segcompress.models import build_network
from lightning_segcompress.pruning import PruningConfig, build_importance, measure, plan_step
from lightning_segcompress.pruning.graph import build_graph
from lightning_segcompress.pruning.importance import compute_group_scores
from lightning_segcompress.pruning.latency import (
    GroupCost,
    KeepBest,
    model_group_costs,
    weights_from_costs,
)
from lightning_segcompress.pruning.latency_model import (
    LatencyModel,
    LayerSpec,
    LayerTable,
    _monotone,
    build_latency_model,
    width_grid,
)
from lightning_segcompress.pruning.state import prune_with_history
from lightning_segcompress.utils.inspection import evaluation_mode, example_input, find_classifier_layers
from support.common import SMP_UNET, trainer_kwargs


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    network = build_network(SMP_UNET, num_classes=3)
    example = example_input(network, size=64)
    return network, example, find_classifier_layers(network, example)


def test_plan_with_latency_weights_hits_the_macs_target(unet):
    network, example, classifier = unet
    # weights in weights_from_costs' range, but fixed: measured ones change from run to run (timing noise)
    modules = dict(network.named_modules())
    groups = compute_group_scores(build_graph(network, example), build_importance("l2"),
                                  [modules[n] for n in classifier], set())
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


# ---- latency as a pruning target: the latency model, plan_step(metric="latency"), the callback -----------------

class FakeTimer:
    """A deterministic 'runtime': every layer costs ``a + b*cin + c*cout + d*MACs`` (bilinear in its widths, so the
    model's interpolation is exact), the network the sum over its convolutions plus ``overhead``. No timing."""

    runtime, threads = "eager", 1

    def __init__(self, overhead: float = 0.2, in_network: float = 1.0) -> None:
        self.overhead, self.in_network = overhead, in_network  # in_network: a layer's share of its isolated time
        self.layers = self.networks = 0

    @staticmethod
    def cost(spec: LayerSpec, cin: int, cout: int, groups: int) -> float:
        pixels = math.prod(spec.in_shape[2:]) / math.prod(spec.stride)
        return 0.01 + 1e-5 * pixels * (cin + cout) + 1e-6 * pixels * math.prod(spec.kernel_size) * cin * cout / groups

    def time_layer(self, spec: LayerSpec, cin: int, cout: int, groups: int = 1) -> float:
        self.layers += 1
        return self.cost(spec, cin, cout, groups)

    def time_network(self, network, example) -> float:
        self.networks += 1
        inputs = {}

        def record(module, args, output):
            inputs.setdefault(module, tuple(args[0].shape))

        handles = [m.register_forward_hook(record) for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
        try:
            with torch.no_grad(), evaluation_mode(network):
                network(example)
        finally:
            for handle in handles:
                handle.remove()
        return self.overhead + self.in_network * sum(
            self.cost(LayerSpec.of(m, shape), m.in_channels, m.out_channels, m.groups) for m, shape in inputs.items())


@pytest.fixture(scope="module")
def fake_model(unet):
    network, example, classifier = unet
    timer = FakeTimer()
    model = build_latency_model(network, example, "eager", ignored_layers=classifier, round_to=8, timer=timer)
    return model, timer


def test_latency_model_times_the_prunable_layers_and_is_exact_at_the_reference(unet, fake_model):
    network, example, classifier = unet
    model, timer = fake_model
    assert model.predict(network) == pytest.approx(model.reference_ms) == pytest.approx(FakeTimer().time_network(
        network, example))
    assert classifier[0] not in model.layers or model.layers[classifier[0]].out_widths == [3]  # never varies
    stem = model.layers["encoder.conv1"]
    assert stem.in_widths == [3] and stem.out_widths == [16, 32, 64]  # the image input is not prunable
    assert model.timings == timer.layers > 0 and timer.networks == 2  # as it is, and uniformly thinned
    assert model.scale == pytest.approx(1.0) and model.calibration["ratio"] == 0.3
    # a second model of the same network reuses the process-wide cache only for real timers; the table is plain data
    again = LatencyModel.from_dict(json.loads(json.dumps(model.as_dict())))
    assert again.predict(network) == pytest.approx(model.predict(network))


def test_latency_target_plan_lands_on_the_predicted_goal_and_the_prediction_holds(unet, fake_model):
    network, example, classifier = unet
    model, _ = fake_model
    config = PruningConfig(ignored_layers=classifier, round_to=8)
    plan = plan_step(network, example, build_importance("l2"), "latency", 0.4, model.reference_ms, config,
                     latency_model=model)
    assert plan.metric == "latency" and isinstance(plan.value, float)
    assert plan.value == pytest.approx(0.6 * model.reference_ms, rel=0.03 * 0.4 / 0.6)  # within tolerance
    assert plan.within_tolerance, plan.as_dict()
    pruned = copy.deepcopy(network)
    prune_with_history(pruned, plan.history, example)
    assert model.predict(pruned) == pytest.approx(plan.value)
    # the fake runtime is bilinear per layer, so interpolation is exact: predicted == "measured"
    assert model.predict(pruned) == pytest.approx(FakeTimer().time_network(pruned, example), rel=1e-6)
    with pytest.raises(ValueError, match="needs a latency_model"):
        plan_step(network, example, build_importance("l2"), "latency", 0.4, 1.0, config)


def test_latency_ranked_plan_reads_group_costs_from_the_model(unet, fake_model):
    network, example, classifier = unet
    model, timer = fake_model
    calls = timer.layers
    costs = model_group_costs(model, network, example, classifier, round_to=8)
    modules = dict(network.named_modules())
    groups = compute_group_scores(build_graph(network, example), build_importance("l2"),
                                  [modules[n] for n in classifier], set())
    assert set(costs) == set(groups) and timer.layers == calls  # read from the model: nothing timed
    assert all(c.saved_ms >= 0 and c.saved_macs > 0 for c in costs.values())
    assert sum(c.saved_ms > 0 for c in costs.values()) > len(costs) / 2  # 8-channel groups cannot shrink (round_to)
    weights = weights_from_costs(costs)
    plan = plan_step(network, example, KeepBest(build_importance("l2"), min_channels=4), "latency", 0.4,
                     model.reference_ms, PruningConfig(ignored_layers=classifier, round_to=4), group_weights=weights,
                     latency_model=model)
    # this tiny net's predicted latency jumps from 0.387 to 0.415 removed as one weighted group crosses the threshold
    assert plan.achieved_fraction == pytest.approx(0.4, abs=0.02), plan.as_dict()


def test_calibration_corrects_isolated_timings_that_are_off_in_proportion(unet):
    """Layers timed alone take 1/0.8 of their time in the network (e.g. their own NCHW/NHWC transposes): the
    second measured network finds the scale, and predictions for other widths stay exact."""
    network, example, classifier = unet
    timer = FakeTimer(in_network=0.8)
    model = build_latency_model(network, example, "eager", ignored_layers=classifier, round_to=8, timer=timer)
    assert model.scale == pytest.approx(0.8)
    uncalibrated = build_latency_model(network, example, "eager", ignored_layers=classifier, round_to=8, timer=timer,
                                       calibration_ratio=None)
    assert uncalibrated.scale == 1.0 and uncalibrated.calibration is None
    plan = plan_step(network, example, build_importance("l2"), "latency", 0.4, model.reference_ms,
                     PruningConfig(ignored_layers=classifier, round_to=8), latency_model=model)
    pruned = copy.deepcopy(network)
    prune_with_history(pruned, plan.history, example)
    truth = timer.time_network(pruned, example)
    assert model.predict(pruned) == pytest.approx(truth, rel=1e-6)
    assert uncalibrated.predict(pruned) < 0.97 * truth  # one point: the saving is overestimated


def test_width_grid_and_interpolation():
    assert width_grid(64, (1.0, 0.5, 0.25), 16) == [16, 32, 64]
    assert width_grid(40, (1.0, 0.5, 0.25), 16) == [16, 32, 40]
    assert width_grid(16, (1.0, 0.5), 16) == [16]
    table = LayerTable("dense", [16, 32], [16, 32], [[1.0, 2.0], [3.0, 4.0]], [32, 32])
    assert table.predict(24, 24) == pytest.approx(2.5)
    assert table.predict(8, 16) == pytest.approx(0.0)  # extrapolated below the grid, never negative
    noisy = LayerTable("dense", [16, 32], [16, 32], _monotone([[5.0, 2.0], [3.0, 4.0]]), [32, 32])
    assert noisy.ms == [[2.0, 2.0], [3.0, 4.0]]  # a narrower point never slower than a wider one


def test_real_eager_latency_model_smoke():
    """The real timer on a tiny net, in eager (fast): structure only, no timing values asserted."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 2, 1))
    example = torch.randn(1, 3, 16, 16)
    model = build_latency_model(network, example, "eager", threads=1, ignored_layers=["4"], round_to=4,
                                runs=1, warmup=0)
    assert set(model.layers) == {"0", "2", "4"}
    assert model.layers["2"].in_widths == model.layers["2"].out_widths == [4, 8, 16]
    assert model.layers["4"].out_widths == [2]
    assert all(ms >= 0 for table in model.layers.values() for row in table.ms for ms in row)
    assert model.predict(network) == pytest.approx(model.measured_ms)


# ---- the callback ----------------------------------------------------------------------------------------------

def test_callback_accepts_latency_and_rejects_unknown_runtimes(monkeypatch):
    pruning = StructuredPruning(amount=0.5, target="latency", runtime="eager", threads=2)
    assert (pruning.target, pruning.runtime, pruning.threads) == ("latency", "eager", 2)
    assert StructuredPruning(target="macs", runtime="onnx").runtime == "onnxruntime"  # the alias resolves
    with pytest.raises(ValueError, match=r"runtime .* must be one of \['eager', 'torchscript_lite', 'executorch', "
                                         r"'onnxruntime'\], got 'tflite'"):
        StructuredPruning(target="latency", runtime="tflite")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        StructuredPruning(target="latency", runtime="eager", threads=0)
    monkeypatch.setattr(executorch_runtime, "executorch_available",
                        lambda: (False, "executorch is not installed: pip install 'lightning-segcompress[executorch]'"))
    with pytest.raises(ImportError, match=r"'executorch' cannot be timed here.*pip install "
                                          r"'lightning-segcompress\[executorch\]'"):
        StructuredPruning(target="latency")  # runtime defaults to executorch
    StructuredPruning(target="macs")  # other targets do not need it


def _latency_fit(root, timer, max_epochs, ckpt_path=None):
    pl.seed_everything(0)
    pruning = StructuredPruning(amount=0.4, target="latency", runtime="eager", schedule="linear", start_epoch=1,
                                end_epoch=3, steps=2, round_to=4, output_dir=str(root / "pruning"))
    pruning.latency_timer = timer
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(**trainer_kwargs(root, max_epochs=max_epochs, callbacks=[pruning, checkpoints],
                                          enable_checkpointing=True, limit_val_batches=0))
    data = SyntheticScenesDataModule(num_classes=3, image_size=(64, 64), num_train=4, num_val=2, num_test=2,
                                     batch_size=2)
    trainer.fit(SegmentationModule(SMP_UNET, num_classes=3), data, ckpt_path=ckpt_path)
    return pruning


def test_callback_latency_target_records_predicted_and_measured_ms_and_resumes(tmp_path):
    timer = FakeTimer()
    pruning = _latency_fit(tmp_path / "a", timer, max_epochs=3)
    records = pruning.records
    assert [r["step"] for r in records] == [1, 2]
    assert timer.networks == 2 + 2  # the reference and its calibration, then one measurement after each step
    reference = pruning.reference["latency"]
    assert reference == pytest.approx(pruning.latency_model.reference_ms)
    for record in records:
        assert record["predicted_ms"] == pytest.approx(record["latency"])
        assert record["measured_ms"] == pytest.approx(record["predicted_ms"], rel=1e-6)  # exact fake runtime
        assert record["runtime"] == "eager" and record["reference_ms"] == pytest.approx(reference)
    assert records[-1]["achieved_fraction"] == pytest.approx(0.4, rel=0.03)
    assert records[-1]["measured_fraction"] == pytest.approx(records[-1]["achieved_fraction"], rel=1e-6)
    written = json.loads((tmp_path / "a" / "pruning" / "pruning_steps.json").read_text())
    assert [(s["predicted_ms"], s["measured_ms"]) for s in written] == \
        [(r["predicted_ms"], r["measured_ms"]) for r in records]

    # resume after step 1: the latency model and its reference come back from the checkpoint, nothing is re-timed
    again = FakeTimer()
    resumed = _latency_fit(tmp_path / "b", again, max_epochs=3, ckpt_path=tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    assert again.layers == 0 and again.networks == 1  # only the measurement after step 2
    assert resumed.reference["latency"] == pytest.approx(reference)
    assert resumed.latency_model.as_dict() == pruning.latency_model.as_dict()
    assert [r["step"] for r in resumed.records] == [1, 2]
    assert resumed.records[-1]["latency"] == pytest.approx(records[-1]["latency"])


def test_callback_latency_ranking_hits_the_target(tmp_path):
    pl.seed_everything(0)
    pruning = StructuredPruning(amount=0.4, target="latency", runtime="eager", latency_ranking=True, round_to=4)
    pruning.latency_timer = FakeTimer()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[pruning], limit_val_batches=0))
    data = SyntheticScenesDataModule(num_classes=3, image_size=(64, 64), num_train=4, num_val=2, num_test=2,
                                     batch_size=2)
    trainer.fit(SegmentationModule(SMP_UNET, num_classes=3), data)
    assert pruning.records[-1]["achieved_fraction"] == pytest.approx(0.4, rel=0.03)
    assert pruning.records[-1]["measured_ms"] == pytest.approx(pruning.records[-1]["predicted_ms"], rel=1e-6)
