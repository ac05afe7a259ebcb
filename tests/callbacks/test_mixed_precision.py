"""Every callback under ``precision="bf16-mixed"`` (CPU autocast here; the same code paths run under CUDA autocast),
the full pipeline recipe in bf16-mixed, helpers that follow the student's device and dtype, and the int8
validation policy: an int8 network stays on the CPU and runs in float32 whatever the trainer's device and precision.
CUDA-only tests are named ``*cuda*`` (``scripts/gpu_check.sh`` runs them with ``-k cuda``)."""

import math

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

from lightning_segcompress.callbacks import (
    KnowledgeDistillation,
    PostPruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    ShuntReplacement,
    SparsityRegularization,
    StructuredPruning,
)
from lightning_segcompress.distillation import Distiller
from lightning_segcompress.quantization import (
    QuantizationConfig,
    calibrate,
    convert_network,
    prepare_network,
    quantization_stage,
)
from lightning_segcompress.quantization.quantize import is_cpu_pinned
from lightning_segcompress.state import get_stages
from support.common import REPO, SMP_DEEPLAB, smoke_override, trainer_kwargs
from support.user_module import TinySegNet, UserSegmenter, loaders

SIZE = [32, 32]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class LossLog(pl.Callback):
    """Every training loss the fit produced (after the callbacks added their terms)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fit(module, callbacks, data, tmp_path, precision="bf16-mixed", accelerator="cpu", **overrides):
    pl.seed_everything(0)
    log = LossLog()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision=precision, accelerator=accelerator,
                                          callbacks=[*callbacks, log], **overrides))
    trainer.fit(module, *data)
    assert log.losses and all(math.isfinite(v) for v in log.losses), log.losses
    return trainer


# ---- every callback, bf16-mixed ------------------------------------------------------------------------------

def _check_pruned(module, trainer, callbacks):
    assert _params(module.segmenter_net) < _params(TinySegNet())
    assert get_stages(module.segmenter_net)[-1]["kind"] == "structured_pruning"


def _check_sparsity(module, trainer, callbacks):
    assert "sparsity/gamma_mean_abs" in trainer.callback_metrics


def _check_kd(module, trainer, callbacks):
    value = trainer.callback_metrics["kd/total_epoch"]
    assert math.isfinite(float(value)) and float(value) > 0


def _check_int8(module, trainer, callbacks):
    stage = quantization_stage(module.segmenter_net)
    assert stage is not None and stage["converted"]
    assert is_cpu_pinned(module.segmenter_net)
    images = torch.rand(2, 3, *SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # validation runs under the trainer's autocast
        out = module.segmenter_net(images)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    trainer.validate(module, loaders()[1], verbose=False)  # validate after fit, the int8 network, bf16-mixed


def _check_post_pruning(module, trainer, callbacks):
    assert any(key.startswith("post_pruning/") for key in trainer.callback_metrics) or \
        _params(module.segmenter_net) <= _params(TinySegNet())


CASES = {
    "structured_pruning": (lambda: [StructuredPruning(amount=0.3, target="params", schedule="linear", start_epoch=1,
                                                      end_epoch=2, steps=1, round_to=None, input_size=SIZE)],
                           {"max_epochs": 2}, _check_pruned),
    "sparsity": (lambda: [SparsityRegularization(method="slimming", strength=1e-3, end_epoch=1, input_size=SIZE)],
                 {"max_epochs": 1}, _check_sparsity),
    "post_pruning": (lambda: [StructuredPruning(amount=0.3, target="params", schedule="linear", start_epoch=0,
                                                end_epoch=1, steps=1, round_to=None, input_size=SIZE),
                              PostPruning(max_group_miou_drop=2.0, eval_batches=1, input_size=SIZE)],
                     {"max_epochs": 1}, _check_post_pruning),
    "distillation": (lambda: [KnowledgeDistillation(teacher="snapshot", losses={"pixel_kl": 1.0, "cirkd_pixel": 1.0},
                                                    hints=[{"student": "body.3", "teacher": "body.3"}],
                                                    input_size=SIZE)],
                     {"max_epochs": 1}, _check_kd),
    "qat_pt2e": (lambda: [QuantizationAwareTraining(start_epoch=0, input_size=SIZE)], {"max_epochs": 1}, _check_int8),
    "qat_fx": (lambda: [QuantizationAwareTraining(backend="fx", start_epoch=0, input_size=SIZE)], {"max_epochs": 1},
               _check_int8),
    "ptq_pt2e": (lambda: [PostTrainingQuantization(calibration_batches=1, input_size=SIZE)], {"max_epochs": 1},
                 _check_int8),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_callback_bf16_mixed(case, tmp_path):
    factory, overrides, check = CASES[case]
    module, callbacks = UserSegmenter(), factory()
    trainer = _fit(module, callbacks, loaders(), tmp_path, **overrides)
    check(module, trainer, callbacks)


def test_shunt_replacement_bf16_mixed(tmp_path):
    from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule
    from lightning_segcompress.shunt import Shunt

    torch.manual_seed(0)
    module = SegmentationModule(SMP_DEEPLAB, num_classes=3)
    data = SyntheticScenesDataModule(num_classes=3, image_size=(64, 64), num_train=4, num_val=2, batch_size=2)
    cb = ShuntReplacement(blocks=[4, 5], stage_a_steps=1, eval_batches=1, input_size=[64, 64])
    _fit(module, [cb], (data,), tmp_path, limit_train_batches=2)
    assert cb.phase == "B"
    assert any(isinstance(m, Shunt) for m in module.net.modules())
    assert math.isfinite(float(module.trainer.callback_metrics["shunt/stage_a_mse_epoch"]))


# ---- the full pipeline recipe ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_pipeline_recipe_bf16_mixed(tmp_path, capsys):
    from lightning_segcompress.cli import main

    recipe = REPO / "recipes" / "full_pipeline.yaml"
    config = yaml.safe_load(recipe.read_text())
    # the recipe's own schedule, compressed into 3 one-batch epochs: pruning in epoch 1, QAT in epoch 2
    config["trainer"]["max_epochs"] = 3
    config["model"]["init_args"]["network"]["init_args"]["encoder_name"] = "tu-mobilenetv3_small_100"
    for callback in config["trainer"]["callbacks"]:
        args = callback.get("init_args", {})
        if callback["class_path"].endswith("StructuredPruning"):
            args.update(start_epoch=1, end_epoch=2, steps=1)
        if callback["class_path"].endswith("QuantizationAwareTraining"):
            args.update(start_epoch=2, freeze_bn_epoch=None, freeze_observer_epoch=None)
    small = tmp_path / "full_pipeline.yaml"
    small.write_text(yaml.safe_dump(config))
    # the benchmark measures eager only: exporting the stages is test_recipes.py's full_pipeline run (fp32)
    main(["fit", "--config", str(small), *smoke_override(recipe), f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed",
          "--trainer.callbacks.init_args.runtimes=[eager]"])
    assert "segcompress fit finished" in capsys.readouterr().out
    report = sorted(tmp_path.glob("*/version_0/benchmark/compression_report.md"))
    assert report and "| final | structured_pruning + quantization |" in report[0].read_text()


# ---- following the student's device and dtype -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_teacher_and_connectors_follow_the_student_dtype(dtype, tmp_path):
    module = UserSegmenter()
    module.segmenter_net.to(dtype)
    teacher = TinySegNet()  # float32, as a teacher spec or checkpoint is built
    cb = KnowledgeDistillation(teacher=teacher, losses={"pixel_kl": 1.0},
                               hints=[{"student": "body.0", "teacher": "body.3"}], input_size=SIZE)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb]))
    trainer.strategy.connect(module)
    cb.setup(trainer, module, "fit")
    try:
        assert {p.dtype for p in cb.distiller.teacher.parameters()} == {dtype}
        assert {p.dtype for p in cb.distiller.connectors.parameters()} == {dtype}
        images = torch.rand(2, 3, *SIZE, dtype=dtype)
        module.segmenter_net(images)
        total, terms = cb.distiller.compute(torch.zeros(2, *SIZE, dtype=torch.long))
        assert total.dtype == torch.float32 and torch.isfinite(total)
    finally:
        cb.teardown(trainer, module, "fit")


def test_distillation_losses_are_float32_under_autocast():
    student, teacher = TinySegNet(), TinySegNet()
    distiller = Distiller(student, teacher, {"pixel_kl": 1.0, "cirkd_pixel": 1.0},
                          hints=[{"student": "body.0", "teacher": "body.3"}],
                          default_feature_layers=("body.5", "body.5"))
    distiller.attach()
    distiller.check(torch.rand(1, 3, *SIZE))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student(torch.rand(2, 3, *SIZE))
        total, terms = distiller.compute(torch.zeros(2, *SIZE, dtype=torch.long))
    assert total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in terms.values()), {k: v.dtype for k, v in terms.items()}
    distiller.detach()


def test_prepare_under_autocast_traces_in_float32():
    """PT2E export and FX tracing run with autocast switched off: no bf16 casts are baked into the graph."""
    for backend in ("pt2e", "fx"):
        network = TinySegNet().eval()
        config = QuantizationConfig(backend=backend, qat=False, example_shape=(2, 3, *SIZE))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prepared = prepare_network(network, config)
        calibrate(prepared, [torch.rand(2, 3, *SIZE)])
        converted = convert_network(prepared)
        assert converted(torch.rand(1, 3, *SIZE)).dtype == torch.float32


# ---- the int8 validation policy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pt2e", "fx"])
def test_int8_network_stays_on_the_cpu(backend):
    network = TinySegNet().eval()
    prepared = prepare_network(network, QuantizationConfig(backend=backend, qat=False, example_shape=(2, 3, *SIZE)))
    calibrate(prepared, [torch.rand(2, 3, *SIZE)])
    converted = convert_network(prepared)
    assert is_cpu_pinned(converted)
    images = torch.rand(1, 3, *SIZE)
    expected = converted(images)
    holder = nn.ModuleDict({"net": converted, "other": nn.Linear(2, 2)})
    holder.to(torch.device("meta"))  # what Lightning's model_to_device does to the whole module
    assert holder["other"].weight.device.type == "meta"
    assert all(t.device.type == "cpu" for t in [*converted.parameters(), *converted.buffers()])
    holder.to(torch.float64)  # a dtype cast leaves the int8 network in float32 too
    out = converted(images.double())
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    torch.testing.assert_close(out.float(), expected)
    state = converted.state_dict()  # checkpoints and exports still see the int8 network itself
    assert state


@CUDA
def test_int8_validation_on_cuda(tmp_path):
    module = UserSegmenter()
    cb = QuantizationAwareTraining(start_epoch=0, input_size=SIZE)
    trainer = _fit(module, [cb], loaders(), tmp_path, accelerator="gpu", devices=1)
    assert quantization_stage(module.segmenter_net)["converted"]
    metrics = trainer.validate(module, loaders()[1], verbose=False)
    assert math.isfinite(metrics[0]["val_loss"])
    assert all(t.device.type == "cpu" for t in module.segmenter_net.parameters())


@CUDA
@pytest.mark.parametrize("case", list(CASES))
def test_callback_bf16_mixed_cuda(case, tmp_path):
    factory, overrides, check = CASES[case]
    module, callbacks = UserSegmenter(), factory()
    trainer = _fit(module, callbacks, loaders(), tmp_path, accelerator="gpu", devices=1, **overrides)
    check(module, trainer, callbacks)


@CUDA
def test_teacher_follows_the_student_to_cuda(tmp_path):
    module = UserSegmenter()
    cb = KnowledgeDistillation(teacher=TinySegNet(), losses={"pixel_kl": 1.0},
                               hints=[{"student": "body.0", "teacher": "body.3"}], input_size=SIZE)
    _fit(module, [cb, _DeviceProbe(cb)], loaders(), tmp_path, accelerator="gpu", devices=1)


class _DeviceProbe(pl.Callback):
    def __init__(self, kd) -> None:
        self.kd = kd

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert {p.device.type for p in self.kd.distiller.teacher.parameters()} == {"cuda"}
        assert {p.device.type for p in self.kd.distiller.connectors.parameters()} == {"cuda"}
