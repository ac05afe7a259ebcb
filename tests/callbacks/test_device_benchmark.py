import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_segcompress import SyntheticScenesDataModule
from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network, compare, executorch_runtime
from lightning_segcompress.benchmark.executorch_runtime import executorch_available
from lightning_segcompress.callbacks import DeviceBenchmark
from lightning_segcompress.models import SegmentationModule, build_network
from lightning_segcompress.utils import count_macs
from support.common import SMP_UNET, TV_LRASPP, trainer_kwargs

FAST = dict(input_shape=(1, 3, 64, 64), warmup=1, runs=2, isolate=False)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [SMP_UNET, TV_LRASPP], ids=["smp-unet", "tv-lraspp"])
def test_lite_export_reload_matches_eager(spec, tmp_path):
    net = build_network(spec, num_classes=3)
    has_executorch = executorch_available()[0]
    runtimes = ("eager", "torchscript_lite", "executorch") if has_executorch else ("eager", "torchscript_lite")
    settings = BenchmarkSettings(runtimes=runtimes, **FAST)
    report = benchmark_network(net, settings, tmp_path)

    if has_executorch:
        et = report["runtimes"]["executorch"]
        assert et["status"] == "ok", et
        assert et["max_abs_diff"] <= 1e-3 and et["partitions"] >= 1
        assert (tmp_path / "model.pte").stat().st_size == pytest.approx(et["size_mb"] * 1e6)
    lite = report["runtimes"]["torchscript_lite"]
    assert lite["status"] == "ok", lite
    assert lite["max_abs_diff"] <= 1e-3 and lite["median_ms"] > 0 and lite["p90_ms"] >= lite["median_ms"]
    assert (tmp_path / "model.ptl").stat().st_size == pytest.approx(lite["size_mb"] * 1e6)
    assert lite["method"] == "trace"
    assert report["runtimes"]["eager"]["status"] == "ok"
    assert report["params"] == sum(p.numel() for p in net.parameters())
    assert report["macs"] == count_macs(net, torch.randn(1, 3, 64, 64))
    assert net.training, "the user's network is benchmarked on a copy, its mode is untouched"

    from torch.jit.mobile import _load_for_lite_interpreter

    reloaded = _load_for_lite_interpreter(str(tmp_path / "model.ptl"))
    x = torch.randn(1, 3, 64, 64)
    expected = net.eval()(x)
    expected = expected["out"] if isinstance(expected, dict) else expected
    assert torch.allclose(reloaded(x), expected, atol=1e-4)


def test_isolated_timing_reports_peak_memory(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    settings = BenchmarkSettings(runtimes=("torchscript_lite",), **dict(FAST, isolate=True))
    lite = benchmark_network(net, settings, tmp_path)["runtimes"]["torchscript_lite"]
    assert lite["status"] == "ok", lite
    assert lite["peak_rss_mb"] >= lite["rss_before_load_mb"] > 0
    assert lite["model_peak_mb"] == pytest.approx(lite["peak_rss_mb"] - lite["rss_before_load_mb"])


class UntraceableNet(nn.Module):
    """A data-dependent Python branch (tracing would bake it in) computed with numpy (scripting fails)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if float(np.mean(x.detach().numpy())) > 0:
            y = y * 2
        return y


def test_export_failure_is_recorded_not_raised(tmp_path):
    settings = BenchmarkSettings(runtimes=("eager", "torchscript_lite"), **FAST)
    report = benchmark_network(UntraceableNet(), settings, tmp_path)
    assert report["runtimes"]["eager"]["status"] == "ok"
    lite = report["runtimes"]["torchscript_lite"]
    assert lite["status"] == "error"
    assert "TorchScript export failed" in lite["error"]["message"] and "script" in lite["error"]["message"]


def test_missing_executorch_is_skipped_with_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(executorch_runtime, "executorch_available", lambda: (False, "executorch is not installed"))
    settings = BenchmarkSettings(runtimes=("executorch",), **FAST)
    entry = benchmark_network(nn.Conv2d(3, 2, 1), settings, tmp_path)["runtimes"]["executorch"]
    assert entry == {"status": "skipped", "reason": "executorch is not installed"}


def test_compare_ratios():
    baseline = {"macs": 400, "params": 100, "runtimes": {"eager": {"status": "ok", "median_ms": 10.0, "size_mb": 4.0},
                                                         "torchscript_lite": {"status": "error"}}}
    current = {"macs": 100, "params": 50, "runtimes": {"eager": {"status": "ok", "median_ms": 5.0, "size_mb": 1.0},
                                                        "torchscript_lite": {"status": "ok", "median_ms": 1.0}}}
    ratios = compare(baseline, current)
    assert ratios == {"eager": {"speedup": 2.0, "size_ratio": 4.0, "macs_ratio": 4.0, "params_ratio": 2.0,
                                "efficiency": 0.5}}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"runtimes": ["tflite"]}, "Unknown runtime"), ({"runs": 0}, "runs must be positive"),
     ({"warmup": -1}, "warmup"), ({"input_size": [3, 64, 64]}, "input_size"), ({"threads": 0}, "threads"),
     ({"every_n_epochs": -2}, "every_n_epochs"), ({"runtimes": []}, "empty"),
     ({"tile_grids": [[2, 0]]}, "tile_grids"), ({"tile_grids": [[2]]}, "tile_grids"),
     ({"bootstrap_resamples": 50}, "bootstrap_resamples")],
)
def test_bad_config_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeviceBenchmark(**kwargs)


class ShrinkAtTrainEnd(Callback):
    """Stands in for a compression technique: swaps in a smaller network before fit ends."""

    def on_train_end(self, trainer, pl_module):
        pl_module.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))


class UserModule(pl.LightningModule):
    """Not a SegmentationModule: training_step returns a dict."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(64, 3, 1))

    def training_step(self, batch, batch_idx):
        images, masks = batch
        return {"loss": nn.functional.cross_entropy(self.net(images), masks, ignore_index=255)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_before_after_ratios_report_files_and_loggers_in_one_fit(tmp_path):
    data = SyntheticScenesDataModule(num_classes=3, image_size=(32, 32), num_train=8, num_val=4, batch_size=4)
    bench = DeviceBenchmark(input_size=[64, 64], runtimes=["eager", "torchscript_lite"], warmup=1, runs=3,
                            isolate=False, output_dir=str(tmp_path / "bench"))
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[ShrinkAtTrainEnd(), bench]))
    trainer.fit(UserModule(), datamodule=data)

    assert set(bench.stages) == {"baseline", "final"}
    ratios = bench.stages["final"]["ratios"]
    for runtime in ("eager", "torchscript_lite"):
        r = ratios[runtime]
        assert r["macs_ratio"] > 10 and r["params_ratio"] > 10  # 64-channel net -> 4-channel net
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["macs_ratio"])

    saved = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert saved["stages"]["final"]["ratios"] == json.loads(json.dumps(ratios))
    assert saved["settings"]["input_shape"] == [1, 3, 64, 64]
    table = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| baseline | torchscript_lite | ok |" in table and "| final | eager | ok |" in table
    assert (tmp_path / "bench" / "final" / "model.ptl").exists()

    logger.save()
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "benchmark/final/torchscript_lite/speedup" in header and "benchmark/baseline/macs" in header


def test_report_gives_each_stage_a_bootstrap_interval_and_iou_per_class(tmp_path):
    from lightning_segcompress.callbacks._validation import labelled_validation_batches
    from lightning_segcompress.utils.metrics import miou_evaluator

    torch.manual_seed(0)
    data = SyntheticScenesDataModule(num_classes=3, image_size=(32, 32), num_train=4, num_val=6, batch_size=2)
    data.class_names = ("sky", "ground", "thing")  # as the Cityscapes / photo-texture data modules name them
    bench = DeviceBenchmark(input_size=[32, 32], runtimes=["eager"], warmup=0, runs=1, isolate=False, memory=False,
                            samples=0, bootstrap_resamples=200, output_dir=str(tmp_path / "bench"))
    module = SegmentationModule(network=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)),
                                num_classes=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[bench]))
    trainer.fit(module, datamodule=data)

    # every stage keeps its per-image confusion matrices: 6 validation images, 3 classes
    assert {name: tuple(c.shape) for name, c in bench.confusions.items()} == {"baseline": (6, 3, 3),
                                                                             "final": (6, 3, 3)}
    final, baseline = bench.stages["final"], bench.stages["baseline"]
    # the mIoU from the confusion matrices is the project's torchmetrics mIoU
    assert final["miou"] == pytest.approx(miou_evaluator(labelled_validation_batches(trainer, None), 3)(
        module.net), abs=1e-6)
    change = final["miou_change"]
    assert change["reference"] == "baseline" and change["images"] == 6 and change["resamples"] == 200
    assert change["estimate"] == pytest.approx(100 * (final["miou"] - baseline["miou"]))
    assert change["low"] <= change["estimate"] <= change["high"]
    assert change["verdict"] in ("better", "worse", "no measurable difference")
    assert baseline["miou_change"]["verdict"] == "reference" and len(final["per_class_iou"]) == 3

    out = tmp_path / "bench"
    assert json.loads((out / "benchmark.json").read_text())["stages"]["final"]["miou_change"] == change
    report = (out / "compression_report.md").read_text()
    assert "| mIoU change (points) | 95% CI (points) | verdict |" in report
    assert f"| {change['low']:+.2f}, {change['high']:+.2f}] | {change['verdict']} |" in report.replace("| [", "| ")
    assert "## IoU per class" in report and "| class | baseline | final |" in report and "| sky |" in report
    saved = json.loads((out / "compression_report.json").read_text())
    assert saved["stages"]["final"]["per_class_iou"] == final["per_class_iou"]


def test_memory_section_and_tiled_stages(tmp_path):
    data = SyntheticScenesDataModule(num_classes=3, image_size=(32, 32), num_train=8, num_val=4, batch_size=4)
    bench = DeviceBenchmark(input_size=[64, 64], runtimes=["eager", "torchscript_lite"], warmup=0, runs=1,
                            isolate=False, tile_grids=[[2, 2]], output_dir=str(tmp_path / "bench"))
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, callbacks=[bench]))
    trainer.fit(UserModule(), datamodule=data)

    assert set(bench.stages) == {"baseline", "baseline_tiled_2x2", "final", "final_tiled_2x2"}
    untiled, tiled = bench.stages["final"]["report"], bench.stages["final_tiled_2x2"]["report"]
    assert tiled["tiling"]["grid"] == [2, 2] and tiled["tiling"]["max_abs_diff_to_untiled"] <= 1e-3
    assert tiled["runtimes"]["torchscript_lite"]["status"] == "ok"
    assert tiled["macs"] > untiled["macs"]  # halos are recomputed
    for report in (untiled, tiled):
        memory = report["memory"]
        assert memory["status"] == "ok", memory
        assert memory["lower_bound_mb"] <= memory["planned_mb"] <= memory["naive_mb"]
        assert memory["int8_planned_mb"] == pytest.approx(memory["planned_mb"] / 4, rel=0.01)
    # the whole network is convolutional, so all of it is tiled: 2x2 tiles need about a quarter of the memory
    assert tiled["memory"]["planned_mb"] < untiled["memory"]["planned_mb"] / 2
    assert tiled["memory"]["measured_peak_mb"] < untiled["memory"]["measured_peak_mb"] / 2

    table = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "## Activation memory" in table and "| final_tiled_2x2 |" in table
    logger.save()
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "benchmark/final_tiled_2x2/memory/planned_mb" in header


def test_failing_export_does_not_stop_training_or_checkpointing(tmp_path):
    module = SegmentationModule(network=UntraceableNet(), num_classes=2)
    data = SyntheticScenesDataModule(num_classes=2, image_size=(32, 32), num_train=8, num_val=4, batch_size=4)
    bench = DeviceBenchmark(input_size=[32, 32], runtimes=["torchscript_lite"], runs=1, warmup=0,
                            isolate=False, output_dir=str(tmp_path / "bench"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, enable_checkpointing=True, callbacks=[bench, checkpoint]))
    trainer.fit(module, datamodule=data)
    assert trainer.state.finished
    assert list((tmp_path / "ckpt").glob("*.ckpt"))
    entry = bench.stages["final"]["report"]["runtimes"]["torchscript_lite"]
    assert entry["status"] == "error" and entry["error"]["type"] == "RuntimeError"
    assert "error: RuntimeError" in (tmp_path / "bench" / "benchmark.md").read_text()


def test_resumed_run_keeps_its_baseline(tmp_path):
    bench = DeviceBenchmark(input_size=[32, 32], runtimes=["eager"], runs=1, isolate=False)
    bench.stages = {"baseline": {"report": {"macs": 5, "runtimes": {}}, "ratios": None}}
    restored = DeviceBenchmark(input_size=[32, 32], runtimes=["eager"])
    bench.confusions = {"baseline": torch.ones(4, 3, 3, dtype=torch.int64)}
    restored.load_state_dict(bench.state_dict())
    assert restored.baseline == {"macs": 5, "runtimes": {}}
    assert torch.equal(restored.confusions["baseline"], bench.confusions["baseline"])  # the report's interval
