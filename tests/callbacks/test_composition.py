"""Callbacks that compose: every pair of compression callbacks, and the full stack, on a user-style module (dict
batches, the network under an attribute no callback knows, ``training_step`` returning a dict): no error, the
expected stages, and checkpoints that restore into a freshly built network with ``weights_only=True`` (for the full
stack in a fresh process). Order does not matter: the full stack gives the same architecture, stages and outputs
in reverse order (every pair reversed at once); each listener gives the same outcome on either side of a stub
producer; and the pairs whose order the stub cannot stand for (two producers; pruning and its plan filter) are fit
in both orders."""

import itertools
import json
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_segcompress.benchmark.compression_report import conv_widths
from lightning_segcompress.callbacks import (
    DeviceBenchmark,
    KnowledgeDistillation,
    PostPruning,
    QuantizationAwareTraining,
    SparsityRegularization,
    StructuredPruning,
)
from lightning_segcompress.callbacks.protocol import CompressionCallback, CompressionProducer
from lightning_segcompress.state import get_stages, load_network_weights, set_stage
from lightning_segcompress.utils.liveness import live_networks
from support.common import SCRIPTS, subprocess_env, trainer_kwargs
from support.user_module import TinySegNet, UserSegmenter, loaders

SIZE = [32, 32]
FACTORIES = {
    "pruning": lambda: StructuredPruning(amount=0.3, target="macs", schedule="linear", start_epoch=1, end_epoch=3,
                                         steps=2, round_to=None, rel_tolerance=0.3, input_size=SIZE),
    "sparsity": lambda: SparsityRegularization(method="slimming", strength=1e-3, end_epoch=2, input_size=SIZE),
    "post_pruning": lambda: PostPruning(max_group_miou_drop=2.0, eval_batches=1, input_size=SIZE),
    "distillation": lambda: KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
                                                  losses={"pixel_kl": 1.0}, input_size=SIZE,
                                                  hints=[{"student": "body.3", "teacher": "body.3"}]),
    "quantization": lambda: QuantizationAwareTraining(backend="fx", start_epoch=3, input_size=SIZE),
    "benchmark": lambda: DeviceBenchmark(input_size=SIZE, runtimes=["eager"], warmup=0, runs=1, isolate=False,
                                         memory=False, report=False, eval_batches=1),
}
PAIRS = list(itertools.combinations(FACTORIES, 2))
# both orders fitted for real: two producers, and a producer with the plan filter (the stub producer has no plan)
BOTH_ORDERS = [("pruning", "quantization"), ("pruning", "post_pruning")]
FULL_STACK = ["sparsity", "pruning", "post_pruning", "distillation", "quantization", "benchmark"]


class HalveHead(CompressionProducer):
    """A stub producer: at the start of epoch 1 it halves the classifier's weights through the protocol (every
    listener is told before and after, a stage is recorded), with none of a real technique's work."""

    kind = "test_halve_head"

    @staticmethod
    def stage_applier(network, stage, applied):
        if applied is None:  # the architecture is unchanged: recording the stage is all there is to replay
            set_stage(network, stage)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        network = self.network(pl_module)
        weight = network.head[0].weight
        before = weight.detach().clone()

        def apply():
            with torch.no_grad():
                weight.mul_(0.5)
            self.record_stage(network, {"factor": 0.5})
            return network

        def undo():
            with torch.no_grad():
                weight.copy_(before)

        self.compress(trainer, pl_module, network, apply=apply, undo=undo)


# the listeners that act on a producer's step whatever its kind (the plan filter acts on pruning plans only)
STUB_LISTENERS = ["sparsity", "distillation", "benchmark"]
CALLBACKS = {**FACTORIES, "stub": HalveHead}


class CountNetworks(pl.Callback):
    """The most networks this fit keeps alive (the module's student counts once) at any training batch or epoch
    end; networks that were alive before the fit (other tests' in this process) do not count."""

    def __init__(self) -> None:
        self.most = 0
        self.before = weakref.WeakSet(live_networks())

    def _count(self, pl_module) -> None:
        student = sum(p.numel() for p in pl_module.segmenter_net.parameters())
        alive = [n for n in live_networks(min_params=student // 4) if n not in self.before]
        self.most = max(self.most, len(alive))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._count(pl_module)


def _fit(names, folder: Path, extra=()):
    folder.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    module = UserSegmenter()
    callbacks = {name: CALLBACKS[name]() for name in names}
    trainer = pl.Trainer(**trainer_kwargs(folder, max_epochs=4, callbacks=[*callbacks.values(), *extra]))
    trainer.fit(module, *loaders())
    checkpoint = folder / "final.ckpt"
    trainer.save_checkpoint(checkpoint)
    network = module.segmenter_net.eval()
    x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = network(x)
    torch.save({"x": x, "out": out}, folder / "reference.pt")
    outcome = {"stages": get_stages(network), "widths": conv_widths(network), "out": out}
    if "benchmark" in callbacks:
        outcome["benchmark_stages"] = sorted(callbacks["benchmark"].stages)
    if "post_pruning" in callbacks:
        outcome["post_pruning"] = [[g["undone"] for g in s["groups"]] for s in callbacks["post_pruning"].steps]
    return outcome, checkpoint


def _restore_in_fresh_process(folders: list[Path]) -> dict:
    cases = folders[0].parent / "cases.json"
    cases.write_text(json.dumps([{"checkpoint": str(f / "final.ckpt"), "reference": str(f / "reference.pt")}
                                 for f in folders]))
    result = subprocess.run([sys.executable, str(SCRIPTS / "restore_check.py"), str(cases)], capture_output=True,
                            text=True, timeout=240, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_orders(names, tmp_path, orders):
    outcomes, folders = [], []
    for index, order in enumerate(orders):
        folder = tmp_path / f"order{index}"
        outcome, _ = _fit(order, folder)
        outcomes.append(outcome)
        folders.append(folder)
    first = outcomes[0]
    for other in outcomes[1:]:
        assert other["stages"] == first["stages"], "the same compression stages in every order"
        assert other["widths"] == first["widths"], "the same architecture in every order"
        assert other.get("benchmark_stages") == first.get("benchmark_stages")
        assert other.get("post_pruning") == first.get("post_pruning")
        torch.testing.assert_close(other["out"], first["out"], rtol=0, atol=1e-5)
    for folder, outcome in zip(folders, outcomes):  # restored into a freshly built network, weights_only=True
        network = load_network_weights(TinySegNet(), folder / "final.ckpt").eval()
        reference = torch.load(folder / "reference.pt", weights_only=True)
        assert conv_widths(network) == outcome["widths"] and get_stages(network) == outcome["stages"]
        with torch.no_grad():
            torch.testing.assert_close(network(reference["x"]), reference["out"], rtol=0, atol=1e-5)
    return first


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_every_pair_composes(pair, tmp_path):
    orders = [list(pair), list(reversed(pair))] if pair in BOTH_ORDERS else [list(pair)]
    outcome = _check_orders(pair, tmp_path, orders)
    kinds = [s["kind"] for s in outcome["stages"]]
    expected = [k for name, k in (("pruning", "structured_pruning"), ("quantization", "quantization")) if name in pair]
    assert kinds == expected
    if "benchmark" in pair:
        assert outcome["benchmark_stages"] == ["baseline", "final"], "one technique or none: no handover"


@pytest.mark.parametrize("listener", STUB_LISTENERS)
def test_a_listener_gives_the_same_outcome_before_or_after_the_producer(listener, tmp_path):
    outcome = _check_orders((listener, "stub"), tmp_path, [[listener, "stub"], ["stub", listener]])
    assert [s["kind"] for s in outcome["stages"]] == ["test_halve_head"]
    if listener == "benchmark":
        assert outcome["benchmark_stages"] == ["baseline", "final"], "one technique: no handover"


@pytest.mark.slow
def test_full_stack_in_two_orders_keeps_at_most_two_networks_alive(tmp_path):
    orders = [FULL_STACK, list(reversed(FULL_STACK))]
    outcomes, folders, counters = [], [], []
    for index, order in enumerate(orders):
        counter = CountNetworks()
        outcome, _ = _fit(order, tmp_path / f"order{index}", extra=[counter])
        outcomes.append(outcome)
        folders.append(tmp_path / f"order{index}")
        counters.append(counter)
    assert outcomes[0]["stages"] == outcomes[1]["stages"]
    assert outcomes[0]["widths"] == outcomes[1]["widths"]
    assert [s["kind"] for s in outcomes[0]["stages"]] == ["structured_pruning", "quantization"]
    assert outcomes[0]["benchmark_stages"] == ["after_structured_pruning", "baseline", "final"]
    assert outcomes[0]["post_pruning"] == outcomes[1]["post_pruning"] and len(outcomes[0]["post_pruning"]) == 2
    torch.testing.assert_close(outcomes[0]["out"], outcomes[1]["out"], rtol=0, atol=1e-5)
    assert [c.most for c in counters] == [2, 2], "the student and KD's teacher, nothing else"
    restored = _restore_in_fresh_process(folders)
    for folder, outcome in zip(folders, outcomes):
        entry = restored[str(folder / "final.ckpt")]
        assert entry["widths"] == outcome["widths"] and entry["difference"] <= 1e-5
    checkpoint = torch.load(folders[0] / "final.ckpt", weights_only=True)
    kd_state = checkpoint["callbacks"]["KnowledgeDistillation"]
    assert "snapshot" not in kd_state and Path(kd_state["teacher_file"]).is_file(), \
        "the teacher is saved once beside the run, not in every checkpoint"


def test_every_callback_speaks_the_protocol_and_stores_its_recipe_arguments():
    for name, factory in FACTORIES.items():
        callback = factory()
        assert isinstance(callback, CompressionCallback) and callback.state_key == type(callback).__name__, name
        hyperparameters = callback.hyperparameters()
        assert hyperparameters["input_size"] == SIZE, name  # what the factory passed, stored as given
        assert json.loads(json.dumps(hyperparameters)) == hyperparameters, name  # plain values, as YAML holds
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same arguments: resuming warns about no changed hyperparameter
            factory().load_state_dict({"hyperparameters": hyperparameters})


def test_resume_with_a_changed_amount_keeps_the_reference_and_the_steps(tmp_path):
    def pruning(amount):
        return StructuredPruning(amount=amount, target="macs", schedule="linear", start_epoch=1, end_epoch=5,
                                 steps=4, round_to=None, rel_tolerance=0.2, input_size=SIZE)

    pl.seed_everything(0)
    first = pruning(0.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[first]))
    trainer.fit(UserSegmenter(), *loaders())
    assert first.steps_done == 2 and first.records[-1]["achieved_fraction"] == pytest.approx(0.25, rel=0.2)
    trainer.save_checkpoint(tmp_path / "two_steps.ckpt")

    resumed = pruning(0.6)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=5, callbacks=[resumed]))
    with pytest.warns(UserWarning, match=r"resumes with changed hyperparameters \(amount: 0.5 -> 0.6"):
        trainer.fit(UserSegmenter(), *loaders(), ckpt_path=tmp_path / "two_steps.ckpt")
    assert resumed.reference == first.reference, "fractions still count from the unpruned network"
    assert [r["step"] for r in resumed.records] == [1, 2, 3, 4] and resumed.steps_done == 4
    assert [r["epoch"] for r in resumed.records[2:]] == [3, 4], "one step per epoch, none replayed"
    assert resumed.records[-1]["achieved_fraction"] == pytest.approx(0.6, rel=0.2)


def test_state_under_a_pre_protocol_key_is_still_taken():
    """Checkpoints written before the key was stable stored ``StructuredPruning{'target': ...}``."""
    legacy = {"steps_done": 2, "reference": {"macs": 100, "params": 10, "channels": 5}, "reference_widths": {},
              "records": [{"step": 1}, {"step": 2}], "input_size": [32, 32]}
    checkpoint = {"callbacks": {"StructuredPruning{'target': 'macs', 'amount': 0.5, 'schedule': 'linear'}": legacy}}
    pruning = FACTORIES["pruning"]()
    pruning.on_load_checkpoint(None, None, checkpoint)
    pruning.load_state_dict(checkpoint["callbacks"][pruning.state_key])
    assert pruning.steps_done == 2 and pruning.reference["macs"] == 100 and len(pruning.records) == 2


def test_deprecated_spellings_warn_and_are_stored_under_the_new_name():
    with pytest.warns(FutureWarning, match=r"StructuredPruning\(tolerance=\.\.\.\) is deprecated"):
        pruning = StructuredPruning(tolerance=0.1)
    assert pruning.rel_tolerance == 0.1 and pruning.hyperparameters()["rel_tolerance"] == 0.1
    assert "tolerance" not in pruning.hyperparameters()
    with pytest.warns(FutureWarning, match=r"input_size \[N, C, H, W\] is deprecated"):
        bench = DeviceBenchmark(input_size=[2, 3, 48, 64])
    assert bench.settings.input_shape == (2, 3, 48, 64)
    assert DeviceBenchmark(input_size=[48, 64], batch_size=2).settings.input_shape == (2, 3, 48, 64)
    with pytest.raises(ValueError, match="got both tolerance=0.1 .* and atol=0.5"):
        DeviceBenchmark(tolerance=0.1, atol=0.5)
