"""StructuredPruning's recovery options: learning-rate rewinding and the accuracy budget (max_miou_drop)."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import lightning_segcompress.callbacks.structured_pruning as structured_pruning
from lightning_segcompress.callbacks import StructuredPruning
from lightning_segcompress.pruning import PruningError, pruning_history
from lightning_segcompress.pruning.budget import MiouBudget, restore, restore_point
from lightning_segcompress.utils.inspection import count_params
from support.common import trainer_kwargs
from support.user_module import UserSegmenter, loaders


class PolySegmenter(UserSegmenter):
    """The user module with a per-step linear decay instead of its per-epoch StepLR."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 100)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class LearningRates(pl.Callback):
    """The first group's learning rate used by every optimizer step, and the schedulers' positions."""

    def __init__(self):
        self.lrs, self.positions = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.positions.append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)


def _fit_recording_lrs(tmp_path, **pruning):
    pl.seed_everything(0)
    recorder = LearningRates()
    callbacks = [StructuredPruning(amount=0.3, start_epoch=2, round_to=None, **pruning), recorder]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, limit_train_batches=2, callbacks=callbacks))
    trainer.fit(PolySegmenter(), *loaders())
    return recorder


def test_lr_rewinding_replays_the_schedule_from_the_rewind_epoch(tmp_path):
    rewound = _fit_recording_lrs(tmp_path / "rewound", lr_rewind_epoch=0)
    kept = _fit_recording_lrs(tmp_path / "kept")
    per_epoch = 2
    # before the step both runs follow the same decaying schedule
    assert rewound.lrs[: 2 * per_epoch] == kept.lrs[: 2 * per_epoch]
    assert kept.lrs[1] < kept.lrs[0]
    # the step at epoch 2 puts the scheduler back to its position at the start of epoch 0, exactly
    assert rewound.positions[2 * per_epoch:] == rewound.positions[: 2 * per_epoch]
    assert rewound.lrs[2 * per_epoch:] == pytest.approx(rewound.lrs[: 2 * per_epoch], rel=0, abs=0)
    # without rewinding the schedule keeps its position
    assert kept.positions == list(range(4 * per_epoch))
    assert kept.lrs[2 * per_epoch] < kept.lrs[0]


def test_lr_rewind_epoch_after_the_schedule_start_is_refused():
    with pytest.raises(ValueError, match="lr_rewind_epoch must be an epoch in 0..start_epoch"):
        StructuredPruning(start_epoch=1, lr_rewind_epoch=2)


# ---- the accuracy budget ---------------------------------------------------------------------------------

@pytest.fixture
def params_score(monkeypatch):
    """A deterministic stand-in for validation mIoU: 0.9 for the unpruned network, falling by 0.5 per removed
    fraction of the parameters (so 10 % fewer parameters cost 5 points)."""
    reference = {}

    def validation_miou(trainer, network, count, ignore_index=255):
        def evaluate(net):
            params = count_params(net)
            reference.setdefault("params", params)
            return 0.9 - 0.5 * (1 - params / reference["params"])

        return evaluate, 1

    monkeypatch.setattr(structured_pruning, "validation_miou", validation_miou)


def test_budget_undoes_the_first_step_over_it_and_stops(tmp_path, params_score):
    pl.seed_everything(0)
    model = UserSegmenter()
    history_after = {}

    class History(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            net = pl_module.segmenter_net
            history_after[trainer.current_epoch] = (pruning_history(net), count_params(net))

    # 5 linear steps of 10 % params at epochs 0-4; 12 points allow 24 %: steps 1 and 2 stay, step 3 (15 points)
    # is judged before step 4 (epoch 3), undone, and steps 4-5 never run
    pruning = StructuredPruning(amount=0.5, target="params", schedule="linear", start_epoch=0, end_epoch=5, steps=5,
                                round_to=None, max_miou_drop=12.0, budget_backoff=False,
                                output_dir=str(tmp_path / "pruning"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=6, limit_train_batches=1,
                                          callbacks=[pruning, History()]))
    trainer.fit(model, *loaders())
    budget = pruning.budget
    assert budget.reference_miou == pytest.approx(0.9)
    assert [(c["step"], c["within_budget"]) for c in budget.checks] == [(1, True), (2, True), (3, False)]
    assert budget.stopped_at_step == 3
    assert budget.summary()["achieved_fraction"] == pytest.approx(0.2, abs=0.02)
    # the network, its weights' shapes and its pruning history are those of after step 2
    history_2, params_2 = history_after[1]
    assert pruning_history(model.segmenter_net) == history_2 and count_params(model.segmenter_net) == params_2
    assert [r["step"] for r in pruning.records] == [1, 2, 3, 3] and pruning.records[-1]["undone"]
    written = json.loads((Path(tmp_path) / "pruning" / "pruning_budget.json").read_text())
    assert written["stopped_at_step"] == 3 and written["checks"][-1]["drop_points"] > 12.0
    # the budget went into the progress state, so a resume does not prune again
    state = pruning.state_dict()
    resumed = StructuredPruning(amount=0.5, target="params", schedule="linear", start_epoch=0, end_epoch=5,
                                steps=5, max_miou_drop=12.0)
    resumed.load_state_dict(state)
    assert resumed.budget.stopped and resumed.steps_done == 5


def test_budget_backoff_bisects_to_the_largest_share_within_it(tmp_path, params_score):
    pl.seed_everything(0)
    model = UserSegmenter()
    # the same schedule and score (50 points per pruned fraction of the params, 12 allowed: 24 %) with backoff:
    # 10 % and 20 % stay, 30 % (15 points) is undone, step 4 aims at 25 % (12.5: undone), step 5 at 22.5 % (stays)
    pruning = StructuredPruning(amount=0.5, target="params", schedule="linear", start_epoch=0, end_epoch=5, steps=5,
                                round_to=None, max_miou_drop=12.0, output_dir=str(tmp_path / "pruning"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=6, limit_train_batches=1, callbacks=[pruning]))
    trainer.fit(model, *loaders())
    budget = pruning.budget
    assert [(c["step"], c["within_budget"]) for c in budget.checks] == [(1, True), (2, True), (3, False), (4, False),
                                                                        (5, True)]
    assert [round(c["achieved_fraction"], 2) for c in budget.checks] == pytest.approx([0.1, 0.2, 0.3, 0.25, 0.225],
                                                                                     abs=0.02)
    summary = budget.summary()
    assert summary["undone_steps"] == [3, 4] and summary["stopped_at_step"] is None
    assert summary["achieved_fraction"] == pytest.approx(0.225, abs=0.02) and summary["final_drop_points"] <= 12.0
    params = count_params(model.segmenter_net)
    reference = count_params(UserSegmenter().segmenter_net)
    assert 1 - params / reference == pytest.approx(summary["achieved_fraction"], abs=0.01)  # what is kept is real
    resumed = StructuredPruning(amount=0.5, target="params", schedule="linear", start_epoch=0, end_epoch=5, steps=5,
                                max_miou_drop=12.0)
    resumed.load_state_dict(pruning.state_dict())
    assert resumed.budget.ceiling == pytest.approx(budget.ceiling) and resumed.budget.target_fraction(0.5) < 0.25


def test_budget_judges_the_last_step_at_the_last_epoch(tmp_path, params_score):
    pl.seed_everything(0)
    model = UserSegmenter()
    params_before = count_params(model.segmenter_net)
    # one 30 % step costs 15 points: within a 20-point budget, it stays
    pruning = StructuredPruning(amount=0.3, target="params", start_epoch=0, round_to=None, rel_tolerance=0.1,
                                max_miou_drop=20.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=1, callbacks=[pruning]))
    trainer.fit(model, *loaders())
    assert [(c["step"], c["epoch"], c["within_budget"]) for c in pruning.budget.checks] == [(1, 2, True)]
    assert count_params(model.segmenter_net) < 0.75 * params_before


def test_budget_needs_an_epoch_after_the_last_step(tmp_path, params_score):
    pruning = StructuredPruning(amount=0.3, start_epoch=1, max_miou_drop=1.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[pruning]))
    with pytest.raises(PruningError, match="raise max_epochs above 2"):
        trainer.fit(UserSegmenter(), *loaders())


def test_budget_arguments_are_checked():
    with pytest.raises(ValueError, match="max_miou_drop is in mIoU points"):
        StructuredPruning(max_miou_drop=-1)
    with pytest.raises(ValueError, match="eval_batches must be >= 1"):
        StructuredPruning(max_miou_drop=1.0, eval_batches=0)


def test_restore_point_brings_back_pruned_and_trained_weights():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    point = restore_point(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)  # training updates survivors in place
    net[0].weight = torch.nn.Parameter(net[0].weight[:4].clone())  # pruning swaps in smaller parameters
    net[0].out_channels = 4
    restore(net, point)
    assert net[0].out_channels == 8
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_budget_bookkeeping():
    budget = MiouBudget(1.0, reference_miou=0.6, backoff=False)
    assert budget.judge(1, 0.595, epoch=2, fraction=0.1)
    assert not budget.judge(2, 0.58, epoch=3, fraction=0.2)
    assert budget.summary()["achieved_fraction"] == 0.1 and budget.stopped_at_step == 2
    assert MiouBudget.from_dict(budget.summary(), 1.0, backoff=False) == budget
    bisecting = MiouBudget(1.0, reference_miou=0.6)
    assert bisecting.target_fraction(0.3) == 0.3  # the schedule's, until a step fails
    bisecting.judge(1, 0.595, epoch=2, fraction=0.1)
    assert not bisecting.judge(2, 0.58, epoch=3, fraction=0.2) and not bisecting.stopped
    assert bisecting.target_fraction(0.3) == pytest.approx(0.15) and bisecting.target_fraction(0.12) == 0.12
    assert MiouBudget.from_dict(bisecting.summary(), 1.0) == bisecting
    with pytest.raises(ValueError, match="no reference mIoU"):
        MiouBudget(1.0).drop_points(0.5)


def test_budget_does_not_undo_a_step_another_technique_built_on(caplog):
    from types import SimpleNamespace

    from lightning_segcompress.callbacks.protocol import CompressionEvent

    pruning = StructuredPruning(max_miou_drop=1.0)
    pruning._restore_point = {"": {}}
    pruning.on_after_compression(None, None, CompressionEvent("structured_pruning", 1, None, 0, 0))
    assert pruning._restore_point is not None  # its own steps keep it
    pruning.on_after_compression(None, None, CompressionEvent("quantization", 1, None, 0, 0))
    assert pruning._restore_point is None
    pruning.budget = MiouBudget(1.0, reference_miou=0.5, checks=[{"step": 1, "drop_points": 5.0}])
    pruning.steps_done = 1
    with pytest.warns(UserWarning, match="another technique .* has changed the network since"):
        pruning._undo_last_step(SimpleNamespace(), None)
