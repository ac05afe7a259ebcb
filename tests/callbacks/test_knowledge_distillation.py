"""KnowledgeDistillation callback: teacher sources, loss wiring, connectors, checkpoints, errors, KD after pruning."""

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule
from lightning_segcompress.callbacks import KnowledgeDistillation, StructuredPruning
from lightning_segcompress.distillation import DistillationError, Distiller
from lightning_segcompress.models import build_network
from lightning_segcompress.pruning import (
    PruningConfig,
    build_importance,
    layer_widths,
    measure,
    plan_step,
    prune_with_history,
    pruning_history,
)
from lightning_segcompress.state import write_to_checkpoint
from lightning_segcompress.utils.inspection import example_input, find_classifier_layers
from support.common import SMP_DEEPLAB, SMP_UNET, TV_LRASPP, trainer_kwargs

UNET_WIDE = {"class_path": "segmentation_models_pytorch.Unet",
             "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [64, 32, 16]}}


def _data(**overrides):
    kwargs = dict(num_classes=4, image_size=(64, 64), num_train=8, num_val=4, num_test=4, batch_size=4)
    kwargs.update(overrides)
    return SyntheticScenesDataModule(**kwargs)


class UserModule(pl.LightningModule):
    """Not a SegmentationModule: its own attribute name and a dict from training_step."""

    def __init__(self, spec=SMP_UNET):
        super().__init__()
        self.segmenter = build_network(spec, num_classes=4)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        return {"loss": F.cross_entropy(self.segmenter(images), masks)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class LossProbe(pl.Callback):
    def __init__(self):
        self.losses, self.kd = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.kd.append(float(trainer.callback_metrics["kd/total_step"]) if "kd/total_step"
                       in trainer.callback_metrics else None)


def test_user_module_gets_the_weighted_kd_loss_from_a_spec_teacher_with_checkpoint(tmp_path):
    torch.manual_seed(0)
    teacher = build_network(UNET_WIDE, num_classes=4)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")  # a bare state dict
    kd = KnowledgeDistillation(teacher=UNET_WIDE, teacher_checkpoint=str(tmp_path / "teacher.pt"),
                               losses={"pixel_kl": 2.0, "cwd": 1.0}, alpha=0.0)
    probe = LossProbe()
    model = UserModule()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd, probe], limit_val_batches=0))
    trainer.fit(model, _data())
    # alpha=0: the loss that was optimised is exactly the distillation loss
    assert probe.losses == pytest.approx(probe.kd, rel=1e-5)
    assert {"kd/pixel_kl_step", "kd/cwd_step"} <= set(trainer.callback_metrics)
    assert all(torch.equal(a, b) for a, b in zip(kd.distiller.teacher.state_dict().values(),
                                                 teacher.state_dict().values()))
    assert not kd.distiller.teacher.training and not any(p.requires_grad for p in kd.distiller.teacher.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())  # the teacher is not part of the student
    assert "training_step" not in model.__dict__ and "configure_optimizers" not in model.__dict__  # unwrapped


def test_alpha_scales_the_modules_own_loss(tmp_path):
    losses = {}
    for alpha in (1.0, 0.5):
        torch.manual_seed(0)
        probe = LossProbe()
        kd = KnowledgeDistillation(teacher=build_network(SMP_UNET, num_classes=4), losses={"pixel_kl": 1.0},
                                   alpha=alpha)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd, probe], limit_train_batches=1,
                                              limit_val_batches=0))
        trainer.fit(UserModule(), _data())
        losses[alpha] = (probe.losses[0], probe.kd[0])
    (total1, kd1), (total05, kd05) = losses[1.0], losses[0.5]
    assert kd1 == pytest.approx(kd05, rel=1e-5)
    own = total1 - kd1
    assert total05 == pytest.approx(0.5 * own + kd05, rel=1e-5)


def _pruned_segmentation_checkpoint(path):
    """A SegmentationModule checkpoint whose network was pruned (compression state as plain data)."""
    torch.manual_seed(1)
    module = SegmentationModule(SMP_UNET, num_classes=4).eval()
    x = example_input(module.net, 64)
    plan = plan_step(module.net, x, build_importance("l1"), "macs", 0.3, measure(module.net, x)["macs"],
                     PruningConfig(ignored_layers=find_classifier_layers(module.net, x)))
    prune_with_history(module.net, plan.history, x)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": pl.__version__}
    write_to_checkpoint(checkpoint, module, "net")
    torch.save(checkpoint, path)
    return module


def test_teacher_from_a_compressed_segmentation_checkpoint(tmp_path):
    source = _pruned_segmentation_checkpoint(tmp_path / "teacher.ckpt")
    kd = KnowledgeDistillation(teacher=str(tmp_path / "teacher.ckpt"), losses={"ace": {"kappa": 0.3}, "pairwise": 1.0})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd]))
    trainer.fit(SegmentationModule(SMP_DEEPLAB, num_classes=4), _data())
    teacher = kd.distiller.teacher
    assert pruning_history(teacher) == pruning_history(source.net) != []
    assert layer_widths(teacher) == layer_widths(source.net)
    assert {"kd/ace_step", "kd/pairwise_step"} <= set(trainer.callback_metrics)
    # pair-wise compares the classifiers' inputs by default (different channel counts are fine)
    assert kd.distiller.student_capture.layers["pairwise"] == ("segmentation_head.0", True)


@pytest.mark.parametrize("wrap", [False, True], ids=["nn.Module", "LightningModule"])
def test_live_module_teacher(tmp_path, wrap):
    teacher = build_network(TV_LRASPP, num_classes=4)
    source = SegmentationModule(teacher, num_classes=4) if wrap else teacher
    kd = KnowledgeDistillation(teacher=source, losses={"pixel_kl": 1.0})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd], limit_train_batches=1))
    trainer.fit(UserModule(), _data())
    assert kd.distiller.teacher is teacher and "kd/pixel_kl_step" in trainer.callback_metrics


def test_snapshot_at_fit_start_is_the_student_before_training(tmp_path):
    model = SegmentationModule(SMP_UNET, num_classes=4)
    initial = copy.deepcopy(model.net.state_dict())
    kd = KnowledgeDistillation(teacher="snapshot", losses={"pixel_kl": 1.0})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd]))
    trainer.fit(model, _data())
    teacher = kd.distiller.teacher
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in initial.items())
    assert any(not torch.equal(model.net.state_dict()[k], v) for k, v in initial.items() if v.is_floating_point())


# ---- relation-based losses (IFVD, CIRKD) ---------------------------------------------------------------------

def test_relation_losses_from_plain_config_train_a_step(tmp_path):
    """ifvd / cirkd_pixel / cirkd_region as YAML gives them: names with plain weights or option dicts."""
    torch.manual_seed(0)
    teacher = build_network(UNET_WIDE, num_classes=4)  # classifier input: 16 channels; the student's: 8
    kd = KnowledgeDistillation(teacher=teacher, alpha=0.0, losses={
        "ifvd": 200, "cirkd_pixel": {"temperature": 0.1, "max_pixels": 256}, "cirkd_region": {"weight": 0.1}})
    probe = LossProbe()
    model = UserModule()
    before = {k: v.clone() for k, v in model.segmenter.state_dict().items() if v.is_floating_point()}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd, probe], limit_train_batches=1,
                                          limit_val_batches=0))
    trainer.fit(model, _data(image_size=(32, 32)))
    metrics = trainer.callback_metrics
    assert {"kd/ifvd_step", "kd/cirkd_pixel_step", "kd/cirkd_region_step"} <= set(metrics)
    assert kd.losses["cirkd_pixel"] == {"weight": 1.0, "temperature": 0.1, "max_pixels": 256}
    assert kd.losses["cirkd_region"] == {"weight": 0.1, "temperature": 0.1, "max_pixels": 1024}
    expected = 200 * metrics["kd/ifvd_step"] + metrics["kd/cirkd_pixel_step"] + 0.1 * metrics["kd/cirkd_region_step"]
    assert probe.losses[0] == pytest.approx(float(expected), rel=1e-4)  # alpha=0: only the weighted KD terms
    assert all(float(metrics[f"kd/{n}_step"]) > 0 for n in ("ifvd", "cirkd_pixel", "cirkd_region"))
    # each feature loss compares the classifiers' inputs by default
    layers = kd.distiller.student_capture.layers
    assert layers["ifvd"] == layers["cirkd_pixel"] == layers["cirkd_region"] == ("segmentation_head.0", True)
    assert any(not torch.equal(model.segmenter.state_dict()[k], v) for k, v in before.items())  # it trained


def test_label_losses_need_labels():
    student, teacher = build_network(SMP_UNET, num_classes=4), build_network(SMP_UNET, num_classes=4)
    layer = ("segmentation_head.0:input", "segmentation_head.0:input")
    distiller = Distiller(student, teacher, {"cirkd_region": 1.0}, default_feature_layers=layer)
    distiller.attach()
    student(torch.randn(2, 3, 32, 32))
    with pytest.raises(DistillationError, match="cirkd_region needs the labels"):
        distiller.compute(None)
    student(torch.randn(2, 3, 32, 32))
    target = torch.full((2, 32, 32), 255)
    target[:, :8] = 1
    total, terms = distiller.compute(target)
    assert set(terms) == {"cirkd_region"} and total.grad_fn is not None
    distiller.detach()


# ---- feature hints and connectors -------------------------------------------------------------------------

HINT = {"student": "decoder.blocks.0.conv1.0", "teacher": "decoder.blocks.0.conv1.0", "weight": 1.0}


def test_connectors_train_save_resume_and_stay_out_of_the_student(tmp_path):
    teacher = build_network(UNET_WIDE, num_classes=4)
    kd = KnowledgeDistillation(teacher=teacher, losses={"pixel_kl": 1.0}, hints=[HINT])
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    model = SegmentationModule(SMP_UNET, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[kd, checkpoints],
                                          enable_checkpointing=True))
    kd_setup = {}

    class Before(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            kd_setup["weights"] = kd.distiller.connectors["hint0"].conv.weight.detach().clone()
            kd_setup["in_optimizer"] = any(p is kd.distiller.connectors["hint0"].conv.weight
                                           for g in trainer.optimizers[0].param_groups for p in g["params"])

    trainer.callbacks.append(Before())
    trainer.fit(model, _data())
    connector = kd.distiller.connectors["hint0"]
    assert connector.conv.in_channels == 32 and connector.conv.out_channels == 64  # student 32 -> teacher 64 channels
    assert kd_setup["in_optimizer"] and not torch.equal(connector.conv.weight, kd_setup["weights"])  # it trained
    assert "kd/hint0_step" in trainer.callback_metrics
    assert not any("connector" in k or "hint" in k for k in model.state_dict())  # never part of the student

    ckpt = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)
    saved = ckpt["callbacks"][kd.state_key]["connectors"]["hint0"]
    assert torch.equal(saved["state_dict"]["conv.weight"], connector.conv.weight)
    # resume: the connector comes back from the checkpoint before training continues
    resumed = KnowledgeDistillation(teacher=teacher, losses={"pixel_kl": 1.0}, hints=[HINT])
    seen = {}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["weight"] = resumed.distiller.connectors["hint0"].conv.weight.detach().clone()

    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "r", max_epochs=3, callbacks=[resumed, AtStart()]))
    trainer.fit(SegmentationModule(SMP_UNET, num_classes=4), _data(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert torch.equal(seen["weight"], connector.conv.weight)


# ---- KD after pruning in one fit --------------------------------------------------------------------------

def test_kd_after_pruning_distils_from_the_unpruned_snapshot(tmp_path):
    model = SegmentationModule(SMP_DEEPLAB, num_classes=4)
    widths_before = layer_widths(model.net)
    kd = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
                               losses={"pixel_kl": 1.0, "cwd": 1.0})
    pruning = StructuredPruning(amount=0.4, target="macs", schedule="one_shot", start_epoch=1)
    probe = LossProbe()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[pruning, kd, probe]))
    trainer.fit(model, _data())
    assert probe.kd[:2] == [None, None] and all(v is not None for v in probe.kd[2:])  # KD starts with the prune
    assert layer_widths(kd.distiller.teacher) == widths_before
    assert layer_widths(model.net) != widths_before and pruning.records[-1]["achieved_fraction"] > 0.38


# ---- manual optimization -------------------------------------------------------------------------------------

class ManualModule(UserModule):
    def __init__(self, kd):
        super().__init__()
        self.automatic_optimization = False
        self.kd = [kd]  # a list, so the callback is not registered as a submodule attribute

    def training_step(self, batch, batch_idx):
        images, masks = batch
        optimizer = self.optimizers()
        loss = F.cross_entropy(self.segmenter(images), masks) + self.kd[0].distillation_loss(self, batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log("manual_loss", loss)


def test_manual_optimization_adds_the_documented_loss_by_hand(tmp_path):
    kd = KnowledgeDistillation(teacher=build_network(SMP_UNET, num_classes=4), losses={"pixel_kl": 1.0})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd], limit_val_batches=0))
    trainer.fit(ManualModule(kd), _data())
    assert "kd/pixel_kl_step" in trainer.callback_metrics and trainer.global_step == 2


# ---- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(teacher="no/such/teacher.ckpt"), "neither 'snapshot' nor an existing checkpoint file"),
    (dict(losses={"kl": 1.0}), "unknown distillation loss 'kl'"),
    (dict(losses={"cwd": {"temp": 2}}), "cwd has no option\\(s\\) \\['temp'\\]"),
    (dict(losses={"ifvd": {"temperature": 2}}), "ifvd has no option\\(s\\) \\['temperature'\\]"),
    (dict(snapshot_at="epoch_3"), "snapshot_at must be one of"),
    (dict(hints=[{"student": "a"}]), "a hint is \\{student: layer, teacher: layer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, DistillationError), match=message):
        KnowledgeDistillation(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(teacher={"class_path": "segmentation_models_pytorch.Unet",
                   "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8],
                                 "classes": 7}}),
     "the student predicts 4 classes and the teacher 7"),
    (dict(hints=[{"student": "decoder.no_such", "teacher": "decoder.blocks.0"}]),
     "student layer 'decoder.no_such' matches no layer of Unet"),
    (dict(hints=[{"student": "decoder.blocks.0", "teacher": "encoder.layer4"}]),
     "layer 'encoder.layer4' did not run in the forward pass"),
])
def test_errors_at_fit_start_name_the_cause(tmp_path, kwargs, message):
    kwargs = {"teacher": SMP_UNET, **kwargs}
    model = SegmentationModule(SMP_UNET, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[KnowledgeDistillation(**kwargs)]))
    with pytest.raises(DistillationError, match=message):
        trainer.fit(model, _data())
    assert trainer.global_step == 0


def test_resumed_fit_distils_from_the_checkpointed_snapshot_teacher(tmp_path):
    """After KD-after-pruning, a resumed fit rebuilds the unpruned snapshot teacher from the checkpoint."""
    kd = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression", losses={"pixel_kl": 1.0})
    pruning = StructuredPruning(amount=0.4, target="macs", schedule="one_shot", start_epoch=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    model = SegmentationModule(SMP_DEEPLAB, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[pruning, kd, checkpoints],
                                          enable_checkpointing=True))
    trainer.fit(model, _data())
    teacher_state = {k: v.clone() for k, v in kd.distiller.teacher.state_dict().items()}

    resumed = KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression", losses={"pixel_kl": 1.0})
    probe = LossProbe()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "r", max_epochs=3, callbacks=[
        StructuredPruning(amount=0.4, target="macs", schedule="one_shot", start_epoch=1), resumed, probe]))
    student = SegmentationModule(SMP_DEEPLAB, num_classes=4)
    trainer.fit(student, _data(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert resumed.active and all(v is not None for v in probe.kd)  # distils from the first resumed step
    assert layer_widths(resumed.distiller.teacher) != layer_widths(student.net)  # unpruned teacher, pruned student
    assert all(torch.equal(resumed.distiller.teacher.state_dict()[k], v) for k, v in teacher_state.items())


def test_teacher_autocast_runs_the_teacher_in_bfloat16_on_cpu(tmp_path):
    seen = {}
    teacher = build_network(SMP_UNET, num_classes=4)
    teacher.segmentation_head.register_forward_hook(lambda m, a, out: seen.update(dtype=out.dtype))
    kd = KnowledgeDistillation(teacher=teacher, losses={"pixel_kl": 1.0}, teacher_autocast=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[kd], limit_train_batches=1, limit_val_batches=0))
    seen.clear()
    trainer.fit(UserModule(), _data())
    assert seen["dtype"] == torch.bfloat16 and "kd/pixel_kl_step" in trainer.callback_metrics


def test_yaml_spec_teacher_stays_a_spec_and_distils_through_the_cli(tmp_path):
    """jsonargparse must hand the callback the {class_path, init_args} dict, not an instantiated module."""
    import yaml

    from lightning_segcompress.cli import SegCompressCLI

    teacher = build_network(UNET_WIDE, num_classes=4)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    recipe = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0,
                    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning_segcompress.callbacks.KnowledgeDistillation",
                                   "init_args": {"teacher": UNET_WIDE, "losses": {"cwd": 1.0},
                                                 "teacher_checkpoint": str(tmp_path / "teacher.pt")}}]},
        "model": {"init_args": {"network": SMP_UNET, "num_classes": 4}},
        "data": {"init_args": {"num_classes": 4, "image_size": [64, 64], "num_train": 8, "num_val": 4,
                               "num_test": 4, "batch_size": 4}},
    }
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(recipe))
    cli = SegCompressCLI(args=["fit", "--config", str(tmp_path / "kd.yaml")])
    kd = next(c for c in cli.trainer.callbacks if isinstance(c, KnowledgeDistillation))
    assert kd.teacher == UNET_WIDE
    assert cli.trainer.global_step == 2 and "kd/cwd_step" in cli.trainer.callback_metrics
    assert all(torch.equal(a, b) for a, b in zip(kd.distiller.teacher.state_dict().values(),
                                                 teacher.state_dict().values()))
