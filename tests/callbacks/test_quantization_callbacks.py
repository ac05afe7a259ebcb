"""QuantizationAwareTraining / PostTrainingQuantization on Lightning: fit, int8 after fit, resume, test(ckpt_path),
prune -> QAT -> export, KD + QAT, YAML, errors."""

import json
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_segcompress import SegmentationModule, SyntheticScenesDataModule, load_compressed
from lightning_segcompress.callbacks import (
    DeviceBenchmark,
    KnowledgeDistillation,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    StructuredPruning,
)
from lightning_segcompress.models import build_network
from lightning_segcompress.quantization import QuantizationError, quantization_stage
from lightning_segcompress.state import write_to_checkpoint
from lightning_segcompress.utils.inspection import has_int8_modules
from support.common import SMP_UNET, TV_LRASPP, subprocess_env, trainer_kwargs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _data(**overrides):
    kwargs = dict(num_classes=4, image_size=(64, 64), num_train=8, num_val=4, num_test=4, batch_size=4)
    kwargs.update(overrides)
    return SyntheticScenesDataModule(**kwargs)


class StageProbe(pl.Callback):
    """Records the network's quantization state at the start of every training epoch."""

    def __init__(self):
        self.states = []

    def on_train_epoch_start(self, trainer, pl_module):
        stage = quantization_stage(pl_module.net)
        self.states.append(None if stage is None else ("converted" if stage["converted"] else "prepared"))


def test_qat_fx_prepares_at_start_epoch_and_fit_ends_with_an_int8_network_that_validate_evaluates(tmp_path):
    pl.seed_everything(0)
    model = SegmentationModule(SMP_UNET, num_classes=4)
    qat = QuantizationAwareTraining(backend="fx", start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=2)
    probe = StageProbe()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[probe, qat]))
    trainer.fit(model, _data())
    # the probe runs before the callback at each epoch start: float at 0 and 1, prepared from epoch 1 on
    assert probe.states == [None, None, "prepared"]
    assert has_int8_modules(model.net) and quantization_stage(model.net)["converted"]
    fake_quant_miou = qat.pre_int8_metric
    assert fake_quant_miou is not None
    metrics = trainer.validate(model, _data())[0]
    assert metrics["quant/fake_quant_val_miou"] == pytest.approx(fake_quant_miou)
    assert 0.0 <= metrics["val_miou"] <= 1.0


def test_qat_on_a_torchvision_mobilenetv3_with_dict_output(tmp_path):
    pl.seed_everything(0)
    model = SegmentationModule(TV_LRASPP, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[QuantizationAwareTraining(backend="fx")]))
    trainer.fit(model, _data())
    assert has_int8_modules(model.net)
    assert isinstance(model.net(torch.randn(1, 3, 64, 64)), dict)
    assert "val_miou" in trainer.validate(model, _data())[0]


def test_resume_mid_qat_and_test_with_ckpt_path_evaluate_the_restored_network(tmp_path):
    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = SegmentationModule(SMP_UNET, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True,
                                          callbacks=[QuantizationAwareTraining(backend="fx", start_epoch=0),
                                                     checkpoints]))
    trainer.fit(model, _data())
    mid_qat = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert torch.load(mid_qat, weights_only=True)["segcompress"]["stages"][0]["converted"] is False

    # resume: the network is prepared again before the weights load, training goes on, the fit ends in int8
    resumed = SegmentationModule(SMP_UNET, num_classes=4)
    probe = StageProbe()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2,
                                          callbacks=[probe, QuantizationAwareTraining(backend="fx")]))
    trainer.fit(resumed, _data(), ckpt_path=str(mid_qat))
    assert probe.states == ["prepared"] and has_int8_modules(resumed.net)

    # test(ckpt_path) after QAT: the callback converts the restored fake-quant network to int8 first
    fresh = SegmentationModule(SMP_UNET, num_classes=4)
    tester = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[QuantizationAwareTraining(backend="fx")]))
    results = tester.test(fresh, _data(), ckpt_path=str(mid_qat))[0]
    assert has_int8_modules(fresh.net) and "test_miou" in results

    # without the callback, in any process: the fake-quant network with the checkpoint's weights
    restored = SegmentationModule.load_from_checkpoint(mid_qat, weights_only=True)
    assert quantization_stage(restored.net)["converted"] is False
    assert load_compressed(SegmentationModule(SMP_UNET, num_classes=4), mid_qat) is not None


def test_prune_then_qat_then_export_in_one_fit(tmp_path):
    pl.seed_everything(0)
    model = SegmentationModule(SMP_UNET, num_classes=4)
    float_params = sum(p.numel() for p in model.net.parameters())
    bench = DeviceBenchmark(input_size=[64, 64], runtimes=["torchscript_lite"], runs=2, warmup=1,
                            isolate=False, output_dir=str(tmp_path / "bench"))
    callbacks = [StructuredPruning(amount=0.5, start_epoch=0, input_size=[64, 64]),
                 QuantizationAwareTraining(backend="fx", start_epoch=1), bench]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=callbacks))
    trainer.fit(model, _data())
    kinds = [s["kind"] for s in model.net._segcompress_stages]
    assert kinds == ["structured_pruning", "quantization"] and has_int8_modules(model.net)
    assert sum(p.numel() for p in build_network(SMP_UNET, num_classes=4).parameters()) == float_params
    lite = {stage: bench.stages[stage]["report"]["runtimes"]["torchscript_lite"] for stage in ("baseline", "final")}
    assert lite["final"]["status"] == "ok", lite["final"]
    assert lite["final"]["size_mb"] < 0.2 * lite["baseline"]["size_mb"]  # half the channels, int8
    final, baseline = bench.stages["final"]["report"], bench.stages["baseline"]["report"]
    assert 0 < final["macs"] < 0.7 * baseline["macs"] and 0 < final["params"] < 0.7 * baseline["params"]


def test_kd_and_qat_compose_on_a_plain_lightning_module(tmp_path):
    class UserModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.segmenter = build_network(SMP_UNET, num_classes=4)

        def training_step(self, batch, batch_idx):
            images, masks = batch
            return F.cross_entropy(self.segmenter(images), masks)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    pl.seed_everything(0)
    model = UserModule()
    kd = KnowledgeDistillation(teacher="snapshot", losses={"pixel_kl": 1.0})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_val_batches=0,
                                          callbacks=[kd, QuantizationAwareTraining(backend="fx", start_epoch=1)]))
    trainer.fit(model, _data())
    assert has_int8_modules(model.segmenter)
    assert kd.distiller.student is not None and "kd/pixel_kl_epoch" in trainer.callback_metrics
    # the distiller followed each network swap: the prepared network's logits in epoch 1 (else no kd term would
    # have been logged), the int8 network after the fit (so the fake-quant one it replaced can be freed)
    assert kd.distiller.student is model.segmenter and quantization_stage(kd.distiller.student)["converted"]


def test_ptq_with_no_training_calibrates_and_converts(tmp_path):
    pl.seed_everything(0)
    model = SegmentationModule(SMP_UNET, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=0,
                                          callbacks=[PostTrainingQuantization(backend="fx", calibration_batches=2)]))
    trainer.fit(model, _data())
    assert has_int8_modules(model.net) and quantization_stage(model.net)["config"]["qat"] is False
    assert "val_miou" in trainer.validate(model, _data())[0]


@pytest.mark.slow
def test_pt2e_qat_fit_ends_with_a_quantize_dequantize_graph(tmp_path):
    pytest.importorskip("executorch")
    pl.seed_everything(0)
    model = SegmentationModule(SMP_UNET, num_classes=4)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[
        QuantizationAwareTraining(backend="pt2e", start_epoch=0, freeze_bn_epoch=1)]))
    trainer.fit(model, _data())
    ops = {str(n.target) for n in model.net.graph.nodes}
    assert any("quantize_per_tensor" in op for op in ops)
    assert "val_miou" in trainer.validate(model, _data(image_size=(96, 96)))[0]  # H and W stay dynamic
    # ExecuTorch runs it as int8 (XNNPACK rounds differently from the reference ops: compared by class)
    from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network

    settings = BenchmarkSettings(input_shape=(1, 3, 64, 64), runtimes=("executorch",), warmup=0, runs=1,
                                 isolate=False, memory=False)
    entry = benchmark_network(model.net, settings, tmp_path / "bench")["runtimes"]["executorch"]
    assert entry["status"] == "ok", entry
    assert entry["argmax_agreement"] >= settings.int8_agreement and entry["max_abs_diff"] > 0

    # a checkpoint written after conversion restores the int8 model exactly, in a process without the callback:
    # through Lightning's load_from_checkpoint, and a plain network's checkpoint through load_compressed
    trainer.save_checkpoint(tmp_path / "int8.ckpt")
    plain = {"state_dict": model.net.state_dict()}
    write_to_checkpoint(plain, model.net, "")
    torch.save(plain, tmp_path / "int8.pt")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = model.eval()(images)
    script = (
        "import json, sys, torch\n"
        "from support import pt2e_patterns\n"
        "pt2e_patterns.install()  # the second restore re-uses the first one's pattern graphs\n"
        "from lightning_segcompress import SegmentationModule, load_compressed\n"
        "from lightning_segcompress.models import build_network\n"
        "from lightning_segcompress.quantization import quantization_stage\n"
        "images = torch.load(sys.argv[1] + '/images.pt')\n"
        "model = SegmentationModule.load_from_checkpoint(sys.argv[1] + '/int8.ckpt', weights_only=True).eval()\n"
        "net = load_compressed(build_network(json.loads(sys.argv[2]), num_classes=4), sys.argv[1] + '/int8.pt')\n"
        "assert quantization_stage(model.net)['converted'] and quantization_stage(net)['converted']\n"
        "with torch.no_grad():\n"
        "    torch.save([model(images), net(images)], sys.argv[1] + '/restored.pt')\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(SMP_UNET)], capture_output=True,
                            text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    from_lightning, from_load_compressed = torch.load(tmp_path / "restored.pt")
    assert torch.equal(from_lightning, expected) and torch.equal(from_load_compressed, expected)


def test_bad_arguments_and_unknown_keep_float_names(tmp_path):
    assert QuantizationAwareTraining().config.backend == PostTrainingQuantization().config.backend == "pt2e"
    with pytest.raises(ValueError, match="backend must be one of"):
        QuantizationAwareTraining(backend="tensorrt")
    with pytest.raises(ValueError, match="engine must be one of"):
        QuantizationAwareTraining(backend="fx", engine="fbgemm2")
    with pytest.raises(ValueError, match="freeze_bn_epoch .* must not come before start_epoch"):
        QuantizationAwareTraining(backend="fx", start_epoch=3, freeze_bn_epoch=1)
    with pytest.raises(ValueError, match="freeze_observer_epoch .* equals start_epoch"):
        QuantizationAwareTraining(start_epoch=2, freeze_observer_epoch=2)
    with pytest.raises(ValueError, match="calibration_batches must be positive"):
        PostTrainingQuantization(calibration_batches=0)
    model = SegmentationModule(SMP_UNET, num_classes=4)
    qat = QuantizationAwareTraining(backend="fx", keep_float=["decoder.nope"])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[qat]))
    with pytest.raises(QuantizationError, match=r"keep_float \['decoder.nope'\] match no layer"):
        trainer.fit(model, _data())


def test_qat_is_configurable_from_yaml(tmp_path):
    import yaml

    from lightning_segcompress.cli import SegCompressCLI

    recipe = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning_segcompress.callbacks.QuantizationAwareTraining",
                                   "init_args": {"backend": "fx", "engine": "x86", "start_epoch": 0,
                                                 "keep_float": ["segmentation_head"]}}]},
        "model": {"init_args": {"network": SMP_UNET, "num_classes": 4}},
        "data": {"init_args": {"num_classes": 4, "image_size": [64, 64], "num_train": 8, "num_val": 4,
                               "num_test": 4, "batch_size": 4}},
    }
    (tmp_path / "qat.yaml").write_text(yaml.safe_dump(recipe))
    cli = SegCompressCLI(args=["fit", "--config", str(tmp_path / "qat.yaml")])
    network = cli.model.net
    assert has_int8_modules(network)
    assert not has_int8_modules(network.segmentation_head)  # kept in float as configured
