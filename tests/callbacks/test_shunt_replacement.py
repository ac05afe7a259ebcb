import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule
from lightning_segcompress.callbacks import DeviceBenchmark, KnowledgeDistillation, ShuntReplacement
from lightning_segcompress.callbacks.protocol import CompressionCallback
from lightning_segcompress.models import build_network
from lightning_segcompress.shunt import Shunt, ShuntError
from lightning_segcompress.state import get_stages
from support.common import SMP_DEEPLAB, SMP_UNET, TV_LRASPP, trainer_kwargs

SPLICED = "encoder.model.blocks.2.1"


def _kd():
    """Stage-B distillation from the original network, the publication's recipe (ACE, kappa 0.3)."""
    return KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression", losses={"ace": {"kappa": 0.3}})


def _data(**overrides):
    kwargs = dict(num_classes=3, image_size=(64, 64), num_train=6, num_val=2, batch_size=2)
    return SyntheticScenesDataModule(**{**kwargs, **overrides})


class ShuntAtEpochStart(Callback):
    """Records the shunt's weights when an epoch starts (after ShuntReplacement, listed before it, acted)."""

    def __init__(self, shunt_replacement):
        self.cb, self.seen = shunt_replacement, {}

    def on_train_start(self, trainer, pl_module):
        if self.cb.shunt is not None:
            self.seen["train_start"] = {k: v.clone() for k, v in self.cb.shunt.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        name = self.cb.plan.names[0]
        module = pl_module.net.get_submodule(name)
        if isinstance(module, Shunt) and "spliced" not in self.seen:
            self.seen["spliced"] = {k: v.clone() for k, v in module.state_dict().items()}


class EventLog(CompressionCallback):
    """Records what each compression announcement shows: (moment, kind, step, is the range spliced in)."""

    def __init__(self):
        self.events = []

    def _record(self, moment, event):
        self.events.append((moment, event.kind, event.step, isinstance(event.network.get_submodule(SPLICED), Shunt)))

    def on_before_compression(self, trainer, pl_module, event):
        self._record("before", event)

    def on_after_compression(self, trainer, pl_module, event):
        self._record("after", event)


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    """Stage A for one epoch (checkpointed), then a resumed fit that splices in epoch 2 and distils with
    KnowledgeDistillation from the network as it was before the splice."""
    tmp = tmp_path_factory.mktemp("shunt")
    torch.manual_seed(0)
    model = SegmentationModule(SMP_DEEPLAB, num_classes=3)
    original = {k: v.clone() for k, v in model.net.state_dict().items()}
    cb = ShuntReplacement(blocks=[4, 5], stage_a_epochs=1, eval_batches=1)
    record = ShuntAtEpochStart(cb)
    checkpoint = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp, max_epochs=1, enable_checkpointing=True,
                                          callbacks=[cb, _kd(), record, checkpoint]))
    trainer.fit(model, _data())
    after_a = {k: v.clone() for k, v in model.net.state_dict().items()}
    shunt_after_a = {k: v.clone() for k, v in cb.shunt.state_dict().items()}
    stage_a = dict(cb=cb, record=record, original=original, after_a=after_a, shunt=shunt_after_a,
                   metrics=dict(trainer.callback_metrics))

    resumed_model = SegmentationModule(SMP_DEEPLAB, num_classes=3)
    cb_b, kd_b, log_b = ShuntReplacement(blocks=[4, 5], stage_a_epochs=1, eval_batches=1), _kd(), EventLog()
    record_b = ShuntAtEpochStart(cb_b)
    trainer_b = pl.Trainer(**trainer_kwargs(tmp, max_epochs=2, callbacks=[cb_b, kd_b, record_b, log_b]))
    trainer_b.fit(resumed_model, _data(), ckpt_path=str(tmp / "ckpt" / "last.ckpt"))
    final = tmp / "final.ckpt"
    trainer_b.save_checkpoint(final)
    return dict(stage_a=stage_a, cb=cb_b, kd=kd_b, events=log_b.events, record=record_b, model=resumed_model,
                ckpt=final, tmp=tmp, metrics=dict(trainer_b.callback_metrics))


def test_stage_a_updates_only_the_shunt(two_stage_run):
    stage_a = two_stage_run["stage_a"]
    cb = stage_a["cb"]
    assert cb.phase == "A"
    for key, value in stage_a["original"].items():  # weights and BN statistics of the original are untouched
        assert torch.equal(value, stage_a["after_a"][key]), key
    start = stage_a["record"].seen["train_start"]
    changed = [k for k, v in stage_a["shunt"].items() if k.endswith("weight") and not torch.equal(v, start[k])]
    assert changed, "the shunt trained"
    assert stage_a["shunt"]["0.1.running_mean"].abs().sum() > 0  # its BN ran in train mode
    assert "shunt/stage_a_mse" in stage_a["metrics"]
    assert not any(k.startswith("kd/") for k in stage_a["metrics"]), "KnowledgeDistillation waits for the splice"
    assert not isinstance(cb.plan, type(None)) and cb.plan.names == ["encoder.model.blocks.2.1",
                                                                      "encoder.model.blocks.2.2"]


def test_stage_b_splices_the_trained_shunt_and_distils(two_stage_run):
    cb, model, kd = two_stage_run["cb"], two_stage_run["model"], two_stage_run["kd"]
    assert cb.phase == "B"
    spliced = two_stage_run["record"].seen["spliced"]
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in two_stage_run["stage_a"]["shunt"].items():  # stage A's shunt, restored from the checkpoint
        if not key.endswith(statistics):
            assert torch.equal(value, spliced[key]), key
    # its BatchNorm statistics were re-estimated once it sat in the network (bn_batches)
    assert not torch.equal(two_stage_run["stage_a"]["shunt"]["0.1.running_mean"], spliced["0.1.running_mean"])
    assert isinstance(model.net.get_submodule("encoder.model.blocks.2.1"), Shunt)
    assert isinstance(model.net.get_submodule("encoder.model.blocks.2.2"), nn.Identity)
    assert "kd/ace" in two_stage_run["metrics"], "the student trains with KnowledgeDistillation's ACE term"
    assert two_stage_run["events"] == [("before", "shunt", 1, False), ("after", "shunt", 1, True)]
    original = two_stage_run["stage_a"]["original"]
    stem = model.net.state_dict()["encoder.model.conv_stem.weight"]
    assert not torch.equal(stem, original["encoder.model.conv_stem.weight"]), "stage B trains the whole network"
    optimizer_params = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in optimizer_params for p in model.net.get_submodule("encoder.model.blocks.2.1").parameters())
    teacher = kd.distiller.teacher  # the protocol's pre-splice snapshot: the unspliced original network
    assert not isinstance(teacher.get_submodule(SPLICED), Shunt) and not get_stages(teacher)
    assert set(teacher.state_dict()) == set(original)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in original.items()), "the teacher is the original"
    report = (two_stage_run["tmp"] / "shunt" / "shunt_report.md").read_text()
    assert "encoder.model.blocks.2.1 .. encoder.model.blocks.2.2" in report and "| feeds decoder |" in report
    assert "mIoU after stage A" in report


def test_fresh_process_restores_the_shunted_model(two_stage_run, tmp_path):
    ckpt = two_stage_run["ckpt"]
    checkpoint = torch.load(ckpt, weights_only=True)  # plain data only
    (stage,) = checkpoint["segcompress"]["stages"]
    assert stage["kind"] == "shunt" and stage["blocks"] == ["encoder.model.blocks.2.1", "encoder.model.blocks.2.2"]
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from lightning_segcompress import SegmentationModule\n"
        "model = SegmentationModule.load_from_checkpoint(sys.argv[1], weights_only=True).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(sys.argv[2])), sys.argv[2] + '.out')\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(ckpt), str(tmp_path / "x.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = two_stage_run["model"].eval()(x)
    assert torch.equal(torch.load(tmp_path / "x.pt.out", weights_only=True), expected)


class UserModule(pl.LightningModule):
    """A plain LightningModule around a torchvision model (dict output, ``model`` attribute)."""

    def __init__(self):
        super().__init__()
        self.model = build_network(TV_LRASPP, num_classes=3)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        return F.cross_entropy(self.model(images)["out"], masks)

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        self.log("val_loss", F.cross_entropy(self.model(images)["out"], masks))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_torchvision_user_module_steps_freeze_before_and_export(tmp_path):
    torch.manual_seed(0)
    module = UserModule()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = ShuntReplacement(blocks=["backbone.8", "backbone.10"], stage_a_steps=1, freeze_before_shunt=True)
    bench = DeviceBenchmark(input_size=[64, 64], runtimes=["torchscript_lite"], warmup=0, runs=1,
                            isolate=False, output_dir=str(tmp_path / "bench"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=3, callbacks=[cb, bench]))
    trainer.fit(module, _data())
    assert cb.phase == "B" and isinstance(module.model.get_submodule("backbone.8"), Shunt)
    after = module.model.state_dict()
    for key in ("backbone.0.0.weight", "backbone.7.block.0.0.weight", "backbone.7.block.0.1.running_mean"):
        assert torch.equal(after[key], before[key]), f"{key} runs before the shunt and stays frozen"
    for key in ("backbone.11.block.0.0.weight", "classifier.low_classifier.weight"):
        assert not torch.equal(after[key], before[key]), f"{key} is fine-tuned"
    lite = bench.stages["final"]["report"]["runtimes"]["torchscript_lite"]
    assert lite["status"] == "ok", lite
    assert bench.stages["final"]["report"]["params"] < bench.stages["baseline"]["report"]["params"]


def test_auto_range_from_yaml_through_segcompress(tmp_path):
    from lightning_segcompress.cli import main

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning_segcompress.callbacks.ShuntReplacement",
                                   "init_args": {"blocks": "auto", "target": {"params": 0.1}, "stage_a_epochs": 1,
                                                 "eval_batches": 1, "variant": "one_block"}}]},
        "model": {"init_args": {"network": SMP_DEEPLAB, "num_classes": 3}},
        "data": {"init_args": {"num_classes": 3, "image_size": [64, 64], "num_train": 4, "num_val": 2,
                               "batch_size": 2}},
    }
    path = tmp_path / "shunt.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    report = (tmp_path / "run" / "shunt" / "shunt_report.md").read_text()
    assert "Range chosen automatically for target {'params': 0.1}" in report
    assert "| KQ |" in report and "'one_block' shunt" in report


def test_shunt_cli_prints_block_map_and_choice(tmp_path, capsys):
    from lightning_segcompress.cli.shunt import main

    main(["--network", yaml.safe_dump(TV_LRASPP), "--num_classes=3", "--batches=1", "--target={params: 0.2}",
          "--data", yaml.safe_dump({"class_path": "lightning_segcompress.SyntheticScenesDataModule",
                                    "init_args": {"num_classes": 3, "image_size": [64, 64], "num_val": 2,
                                                  "batch_size": 2}}),
          f"--output={tmp_path / 'kq.md'}"])
    out = capsys.readouterr().out
    assert "| backbone.14 |" in out and "| KQ |" in out and "blocks: auto with target" in out
    assert (tmp_path / "kq.md").read_text().strip() == out.strip()


class ManualModule(SegmentationModule):
    def __init__(self):
        super().__init__(SMP_DEEPLAB, num_classes=3)
        self.automatic_optimization = False


@pytest.mark.parametrize("module, callback, trainer_overrides, match", [
    (lambda: SegmentationModule(SMP_UNET, num_classes=3), lambda: ShuntReplacement(blocks=[1, 2]), {},
     "no supported MobileNetV3 backbone"),
    (lambda: SegmentationModule(SMP_DEEPLAB, num_classes=3), lambda: ShuntReplacement(blocks=[0, 2]), {},
     r"feeds the decoder \(a skip connection\)"),
    (lambda: SegmentationModule(SMP_DEEPLAB, num_classes=3), lambda: ShuntReplacement(target={"params": 0.1}),
     {"limit_val_batches": 0}, "no validation batches"),
    (ManualModule, lambda: ShuntReplacement(blocks=[4, 5]), {}, "manual optimization"),
], ids=["backbone", "skip-connection", "auto-without-validation", "manual-optimization"])
def test_errors_at_fit_start(module, callback, trainer_overrides, match, tmp_path):
    model = module()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback()], **trainer_overrides))
    with pytest.raises(ShuntError, match=match):
        trainer.fit(model, _data())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks=[3]), r"\[first, last\]"),
    (dict(blocks="auto"), "needs target"),
    (dict(target={"flops": 0.2}), "needs target"),
    (dict(target={"params": 1.5}), r"in \(0, 1\)"),
    (dict(blocks=[1, 2], variant="arch9"), "variant must be one of"),
    (dict(blocks=[1, 2], stage_a_epochs=-1), "must be >= 0"),
    (dict(blocks=[1, 2], eval_batches=0), r"eval_batches must be >= 1 \(or None for all\)"),
    (dict(blocks=[1, 2], eval_batches=2, kq_batches=3), "got both kq_batches=3"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShuntReplacement(**kwargs)


KD_LINE = 'KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression", losses={"ace": {"kappa": 0.3}}'


@pytest.mark.parametrize("kwargs, match", [
    (dict(distillation=True), re.escape(KD_LINE + ")")),
    (dict(distillation={"ace": {"kappa": 0.3}}), re.escape(KD_LINE + ")")),
    (dict(distillation={"pixel_kl": 1.0}), re.escape('losses={"pixel_kl": 1.0})')),
    (dict(distillation=True, alpha=0.5), re.escape(KD_LINE + ", alpha=0.5)")),
    (dict(alpha=0.5), re.escape(KD_LINE + ", alpha=0.5)")),
    (dict(distillation=False), "drop the argument"),
], ids=["true", "ace", "pixel_kl", "with-alpha", "alpha", "false"])
def test_removed_distillation_arguments_say_what_to_use_instead(kwargs, match):
    with pytest.raises(ValueError, match="moved out of ShuntReplacement") as error:
        ShuntReplacement(blocks=[4, 5], **kwargs)
    assert re.search(match, str(error.value)), str(error.value)


def test_deprecated_spellings_still_work(tmp_path):
    with pytest.warns(FutureWarning, match=r"kq_batches=\.\.\.\) is deprecated.*use eval_batches"), \
            pytest.warns(FutureWarning, match=r"report_dir=\.\.\.\) is deprecated.*use output_dir"):
        cb = ShuntReplacement(blocks=[4, 5], stage_a_steps=1, kq_batches=1, report_dir=str(tmp_path / "report"))
    assert cb.eval_batches == 1 and cb.output_dir == str(tmp_path / "report")
    model = SegmentationModule(SMP_DEEPLAB, num_classes=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=2, callbacks=[cb]))
    trainer.fit(model, _data())
    assert cb.phase == "B" and cb._evaluated_batches == 1
    assert "mIoU after stage A" in (tmp_path / "report" / "shunt_report.md").read_text()


class FailsAfterCompression(CompressionCallback):
    def on_after_compression(self, trainer, pl_module, event):
        raise RuntimeError("observer failed")


def test_a_failed_splice_leaves_the_network_as_before(tmp_path):
    torch.manual_seed(0)
    model = SegmentationModule(SMP_DEEPLAB, num_classes=3)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    cb = ShuntReplacement(blocks=[4, 5], stage_a_steps=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=2, callbacks=[cb, FailsAfterCompression()]))
    with pytest.raises(RuntimeError, match="observer failed"):
        trainer.fit(model, _data())
    assert cb.phase == "A" and not get_stages(model.net)
    assert not isinstance(model.net.get_submodule(SPLICED), Shunt)
    after = model.net.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in model.net.parameters()), "still frozen as in stage A"


def test_resumed_stage_b_distils_from_the_original_snapshot(two_stage_run, tmp_path):
    cb, kd = ShuntReplacement(blocks=[4, 5], stage_a_epochs=1, eval_batches=1), _kd()
    model = SegmentationModule(SMP_DEEPLAB, num_classes=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=1, callbacks=[cb, kd]))
    trainer.fit(model, _data(), ckpt_path=str(two_stage_run["ckpt"]))
    assert cb.phase == "B" and isinstance(model.net.get_submodule(SPLICED), Shunt)
    original = two_stage_run["stage_a"]["original"]
    assert not isinstance(kd.distiller.teacher.get_submodule(SPLICED), Shunt)
    teacher = kd.distiller.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in original.items())
    assert "kd/ace" in trainer.callback_metrics
