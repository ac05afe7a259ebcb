"""StructuredPruning callback: schedules in a fit, optimizer rebuild, restore from checkpoints, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule
from lightning_segcompress.callbacks import StructuredPruning
from lightning_segcompress.models import build_network
from lightning_segcompress.pruning import PruningError, PruningSchedule, layer_widths, pruning_history
from lightning_segcompress.utils.inspection import count_params
from support.common import SMP_DEEPLAB, SMP_UNET, TV_LRASPP, subprocess_env, trainer_kwargs


def _data(**overrides):
    kwargs = dict(num_classes=4, image_size=(64, 64), num_train=8, num_val=4, num_test=4, batch_size=4)
    kwargs.update(overrides)
    return SyntheticScenesDataModule(**kwargs)


def _agp(**overrides):
    kwargs = dict(amount=0.5, target="macs", importance="l2", schedule="agp", start_epoch=1, end_epoch=4, steps=3)
    kwargs.update(overrides)
    return StructuredPruning(**kwargs)


class WidthsAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.widths = layer_widths(pl_module.net)
        self.history = pruning_history(pl_module.net)


@pytest.fixture(scope="module")
def agp_run(tmp_path_factory):
    """One AGP fit (steps at epochs 1, 2, 3), a checkpoint after every epoch and a CSV log."""
    root = tmp_path_factory.mktemp("agp")
    pl.seed_everything(0)
    model = SegmentationModule(SMP_DEEPLAB, num_classes=4)
    pruning = _agp()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(**trainer_kwargs(root, max_epochs=4, callbacks=[pruning, checkpoints],
                                          enable_checkpointing=True, logger=CSVLogger(root, name="logs")))
    trainer.fit(model, _data())
    return {"root": root, "model": model.eval(), "pruning": pruning, "trainer": trainer,
            "ckpt": {e: root / "ckpt" / f"epoch={e}.ckpt" for e in range(4)}}


# ---- the schedule in a fit --------------------------------------------------------------------------------

def test_agp_steps_run_at_their_epochs_and_end_within_tolerance(agp_run):
    records = agp_run["pruning"].records
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 1), (2, 2), (3, 3)]
    schedule = PruningSchedule("agp", amount=0.5, start_epoch=1, end_epoch=4, steps=3)
    for record in records:
        assert record["requested_fraction"] == pytest.approx(schedule.fraction_after(record["step"]))
    assert records[-1]["achieved_fraction"] == pytest.approx(0.5, rel=0.03)
    macs = [r["macs"] for r in records]
    assert macs == sorted(macs, reverse=True) and count_params(agp_run["model"]) == records[-1]["params"]


def test_each_step_is_logged_and_written_with_channels_per_layer(agp_run):
    log_dir = Path(agp_run["trainer"].logger.log_dir)
    steps = json.loads((log_dir / "pruning" / "pruning_steps.json").read_text())
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["channels_per_layer"] for s in steps)
    assert steps[-1]["channels_per_layer"] == layer_widths(agp_run["model"].net)
    stem = "encoder.model.conv_stem"
    assert steps[0]["channels_per_layer"]["segmentation_head.0"] == 4  # the classifier is never pruned
    assert steps[0]["channels_per_layer"][stem] >= steps[-1]["channels_per_layer"][stem]
    metrics = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"pruning/macs", "pruning/params", "pruning/achieved_fraction"} <= set(metrics)


def test_fit_resumes_mid_schedule_with_the_checkpointed_architecture(agp_run, tmp_path):
    """From the checkpoint after step 1, a new fit restores step 1's architecture, then runs steps 2 and 3."""
    after_step_1 = json.loads((Path(agp_run["trainer"].logger.log_dir) / "pruning" / "pruning_steps.json")
                              .read_text())[0]["channels_per_layer"]
    probe, pruning = WidthsAtTrainStart(), _agp()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[pruning, probe]))
    trainer.fit(SegmentationModule(SMP_DEEPLAB, num_classes=4), _data(), ckpt_path=agp_run["ckpt"][1])
    assert probe.widths == after_step_1
    # the per-layer floor still counts from the unpruned widths, which came back with the callback state
    assert pruning.reference_widths == layer_widths(SegmentationModule(SMP_DEEPLAB, num_classes=4).net)
    assert [(r["step"], r["epoch"]) for r in pruning.records] == [(1, 1), (2, 2), (3, 3)]  # step 1 from the ckpt
    assert pruning.records[-1]["achieved_fraction"] == pytest.approx(0.5, rel=0.03)


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "segmentation-module-alone"])
def test_validate_test_predict_from_a_pruned_checkpoint(agp_run, tmp_path, with_callback):
    ckpt = agp_run["ckpt"][3]
    callbacks = [_agp()] if with_callback else []
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks))
    model = SegmentationModule(SMP_DEEPLAB, num_classes=4)
    assert trainer.validate(model, _data(), ckpt_path=ckpt)[0]["val_miou"] >= 0
    assert trainer.test(model, _data(), ckpt_path=ckpt)[0]["test_miou"] >= 0
    predictions = trainer.predict(model, _data(), ckpt_path=ckpt)
    assert predictions[0].shape[-2:] == (64, 64)
    assert layer_widths(model.net) == layer_widths(agp_run["model"].net)


def test_fresh_process_restores_identical_outputs(agp_run, tmp_path):
    """Without the callback, ``load_compressed`` (and ``load_from_checkpoint``) rebuild the pruned model."""
    ckpt = agp_run["ckpt"][3]
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from support.common import SMP_DEEPLAB\n"
        "from lightning_segcompress import SegmentationModule, load_compressed\n"
        "model = load_compressed(SegmentationModule(SMP_DEEPLAB, num_classes=4), sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(sys.argv[2])), sys.argv[2] + '.out')\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(ckpt), str(tmp_path / "x.pt")],
                            capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    restored = torch.load(tmp_path / "x.pt.out", weights_only=True)
    reloaded = SegmentationModule.load_from_checkpoint(ckpt, weights_only=True).eval()
    with torch.no_grad():
        assert torch.equal(restored, reloaded(x))
        assert torch.allclose(restored, agp_run["model"](x), atol=1e-6)
    checkpoint = torch.load(ckpt, weights_only=True)  # plain data: no pickled module anywhere
    assert checkpoint["segcompress"]["stages"][0]["kind"] == "structured_pruning"
    assert checkpoint["callbacks"][agp_run["pruning"].state_key]["steps_done"] == 3


# ---- any LightningModule; optimizers and schedulers follow the surgery ----------------------------------

class UserModule(pl.LightningModule):
    """Not a SegmentationModule: its own attribute name, torchvision's dict output, a dict from training_step,
    SGD + StepLR."""

    def __init__(self):
        super().__init__()
        self.segmenter = build_network(TV_LRASPP, num_classes=4)

    def forward(self, x):
        return self.segmenter(x)["out"]

    def training_step(self, batch, batch_idx):
        images, masks = batch
        loss = F.cross_entropy(self(images), masks)
        return {"loss": loss, "pixels": masks.numel()}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class ParameterProbe(pl.Callback):
    """Snapshots every parameter right after the pruning step (same hook, registered after the pruner)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.after_prune = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            self.model_params = {id(p) for p in pl_module.parameters()}
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.scheduler_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.unchanged = [n for n, p in pl_module.named_parameters() if torch.equal(p, self.after_prune[n])]


def test_plain_user_module_keeps_training_every_parameter_after_pruning(tmp_path):
    pl.seed_everything(0)
    model, probe = UserModule(), ParameterProbe()
    pruning = StructuredPruning(amount=0.4, target="macs", schedule="one_shot", start_epoch=1, importance="l1")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[pruning, probe],
                                          limit_val_batches=0))
    trainer.fit(model, _data())
    assert pruning.records[-1]["achieved_fraction"] == pytest.approx(0.4, rel=0.03)
    assert probe.optimizer_params == probe.model_params  # the optimizer holds the new (pruned) parameters
    assert probe.unchanged == []  # ... and every one of them was updated after the step
    assert probe.scheduler_epoch == 1 and probe.lr == pytest.approx(0.05)  # StepLR kept its position
    assert model.segmenter.classifier.low_classifier.out_channels == 4
    assert model.segmenter.classifier.high_classifier.out_channels == 4


def test_unreachable_params_target_explains_unused_layers(tmp_path):
    """smp's Unet(encoder_depth=3) keeps resnet18's layer3/layer4 although its forward never runs them."""
    pruning = StructuredPruning(amount=0.4, target="params", schedule="one_shot", start_epoch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[pruning]))
    model = SegmentationModule(SMP_UNET, num_classes=4)
    widths = layer_widths(model.net)
    with pytest.raises(PruningError, match="the closest plan removes 0.0.* of params, not 0.400.*parameters sit in "
                                           "layers the forward never runs \\(encoder.layer3, encoder.layer4\\)"):
        trainer.fit(model, _data())
    assert layer_widths(model.net) == widths


def test_taylor_importance_prunes_after_its_gradient_batches(tmp_path):
    pruning = StructuredPruning(amount=0.3, target="macs", importance="taylor", taylor_batches=2,
                                schedule="one_shot", start_epoch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[pruning]))
    trainer.fit(SegmentationModule(SMP_UNET, num_classes=4), _data(num_train=12))
    (record,) = pruning.records
    assert record["global_step"] == 2  # two optimizer steps fed the gradients, the third batch is pruned
    assert record["achieved_fraction"] == pytest.approx(0.3, rel=0.03)


def test_taylor_importance_with_one_batch_epochs_prunes_at_the_next_epochs_start(tmp_path):
    pruning = StructuredPruning(amount=0.3, target="macs", importance="taylor", taylor_batches=8,
                                schedule="one_shot", start_epoch=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=1, callbacks=[pruning]))
    trainer.fit(SegmentationModule(SMP_UNET, num_classes=4), _data(num_train=4))
    (record,) = pruning.records
    assert (record["epoch"], record["global_step"]) == (1, 1), "epoch 0's one gradient batch is kept, not dropped"


# ---- bad input and failures -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(amount=1.5), "amount must be a fraction in \\(0, 1\\)"),
    (dict(target="flops"), "target must be one of \\['macs', 'params', 'channels', 'latency'\\]"),
    (dict(importance="magnitude"), "Unknown importance 'magnitude': use one of"),
    (dict(importance="no_such_pkg.Score"), "Cannot import importance class 'no_such_pkg.Score'"),
    (dict(schedule="agp", start_epoch=0, end_epoch=2, steps=4), "4 steps need at least 4 epochs"),
    (dict(on_failure="ignore"), "on_failure must be 'raise' or 'skip'"),
])
def test_bad_arguments_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**kwargs)


def test_ignored_layer_pattern_matching_nothing_fails_at_fit_start(tmp_path):
    model = SegmentationModule(SMP_UNET, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[StructuredPruning(ignored_layers=["decoder\\.nope.*"])]))
    with pytest.raises(ValueError, match="ignored_layers .*nope.* match no layer of Unet. Use module names") as err:
        trainer.fit(model, _data())
    assert "'encoder.conv1'" in str(err.value)  # real names are suggested
    assert trainer.global_step == 0


class Scale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))  # a parameter torch-pruning has no pruner for

    def forward(self, x):
        return x * self.gamma


class ScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Scale(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.body(x))


class ScaleNetModule(UserModule):
    def __init__(self):
        pl.LightningModule.__init__(self)
        self.segmenter = ScaleNet()

    def forward(self, x):
        return self.segmenter(x)


def test_unsupported_layer_fails_at_fit_start_naming_it(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[StructuredPruning()]))
    message = "no pruner for layer\\(s\\) 'body.3' \\(Scale\\).*ignored_layers: \\['body.3'\\]"
    with pytest.raises(PruningError, match=message):
        trainer.fit(ScaleNetModule(), _data())


def _failing_rebuild(trainer):
    raise RuntimeError("optimizer rebuild exploded")


@pytest.mark.parametrize("on_failure", ["raise", "skip"])
def test_a_failing_step_leaves_the_network_exactly_as_before(tmp_path, monkeypatch, on_failure):
    """The step fails after the channels were cut (while rebuilding the optimizers): everything is rolled back."""
    import lightning_segcompress.callbacks.protocol as module

    monkeypatch.setattr(module, "rebuild_optimizers", _failing_rebuild)

    class Before(pl.Callback):  # registered first, so it runs before the pruning step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.params = [(id(p), p.detach().clone()) for p in pl_module.parameters()]

    class After(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.params = [(id(p), p.detach().clone()) for p in pl_module.parameters()]

    model = SegmentationModule(SMP_UNET, num_classes=4)
    widths = layer_widths(model.net)
    before, after = Before(), After()
    pruning = StructuredPruning(amount=0.3, on_failure=on_failure)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[before, pruning, after]))
    if on_failure == "raise":
        with pytest.raises(PruningError, match="step 1/1 failed; the network is unchanged.*optimizer rebuild exploded"):
            trainer.fit(model, _data())
        after.params = [(id(p), p.detach().clone()) for p in model.parameters()]
    else:
        with pytest.warns(UserWarning, match="Training continues"):
            trainer.fit(model, _data())
        assert trainer.global_step == 2  # training went on, unpruned
    assert layer_widths(model.net) == widths and pruning_history(model.net) == []
    assert [i for i, _ in after.params] == [i for i, _ in before.params]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after.params, before.params))

