import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from lightning_segcompress import SyntheticScenesDataModule
from lightning_segcompress.benchmark.compression_report import (
    accuracy_statistics,
    compression_table,
    conv_widths,
    per_class_table,
    stage_rows,
    write_compression_report,
)
from lightning_segcompress.callbacks import (
    DeviceBenchmark,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    StructuredPruning,
)
from lightning_segcompress.callbacks._validation import validation_batches
from lightning_segcompress.models import SegmentationModule
from lightning_segcompress.quantization import QuantizationConfig, prepare_network
from lightning_segcompress.utils.batch import split_batch
from lightning_segcompress.utils.metrics import miou_evaluator
from lightning_segcompress.utils.statistics import confusion_matrices, miou_from_confusion
from support.common import SMP_UNET, trainer_kwargs

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_has_a_row_per_technique_with_accuracy_plots_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    data = SyntheticScenesDataModule(num_classes=3, image_size=(64, 64), num_train=4, num_val=4, batch_size=2)
    kd = KnowledgeDistillation(snapshot_at="before_compression", losses={"pixel_kl": 1.0})
    bench = DeviceBenchmark(input_size=[64, 64], runtimes=["eager", "torchscript_lite"], warmup=0, runs=1,
                            isolate=False, eval_batches=1, samples=2, output_dir=str(tmp_path / "bench"))
    callbacks = [kd, StructuredPruning(amount=0.4, schedule="linear", start_epoch=1, end_epoch=3, steps=2),
                 QuantizationAwareTraining(backend="fx", start_epoch=3), bench]
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, limit_train_batches=1, logger=logger,
                                          callbacks=callbacks))
    module = SegmentationModule(network=SMP_UNET, num_classes=3)
    trainer.fit(module, datamodule=data)

    stages = bench.stages
    assert list(stages) == ["baseline", "after_structured_pruning", "final"]
    assert [stages[s]["techniques"] for s in stages] == [[], ["structured_pruning"],
                                                         ["structured_pruning", "quantization"]]
    # the baseline's accuracy is the trained network's right before the first pruning step (= KD's teacher)
    batches = [split_batch(b) for b in validation_batches(trainer, 1)]
    assert stages["baseline"]["miou"] == pytest.approx(miou_evaluator(batches, 3)(kd.distiller.teacher), abs=1e-6)
    # the final accuracy is the int8 network's, as Lightning's own validation measures it
    validated = trainer.validate(module, datamodule=data, verbose=False)[0]["val_miou"]
    assert stages["final"]["miou"] == pytest.approx(validated, abs=1e-5)
    base, pruned, final = (stages[s]["report"] for s in stages)
    assert pruned["params"] < base["params"] and pruned["macs"] < 0.75 * base["macs"]
    base_widths, pruned_widths = stages["baseline"]["channels"], stages["after_structured_pruning"]["channels"]
    assert sum(pruned_widths.values()) < sum(base_widths.values())
    assert set(stages["final"]["channels"]) <= set(base_widths)  # int8 layers keep the float names
    lite = {s: stages[s]["report"]["runtimes"]["torchscript_lite"] for s in stages}
    assert lite["final"]["size_mb"] < lite["after_structured_pruning"]["size_mb"] / 2.5  # int8 weights
    assert stages["final"]["ratios"]["torchscript_lite"]["size_ratio"] == pytest.approx(
        lite["baseline"]["size_mb"] / lite["final"]["size_mb"])

    out = tmp_path / "bench"
    report = (out / "compression_report.md").read_text()
    for stage in stages:
        assert f"| {stage} |" in report
    assert "| final | structured_pruning + quantization |" in report
    # the accuracy change has a paired-bootstrap interval over the validation images and a verdict; IoU per class
    assert "| mIoU change (points) | 95% CI (points) | verdict |" in report and "## IoU per class" in report
    assert stages["final"]["miou_change"]["images"] == 2 and stages["baseline"]["miou_change"]["verdict"] == \
        "reference"
    assert f"| {stages['final']['miou_change']['verdict']} |" in report
    assert "<table>" in (out / "compression_report.html").read_text()
    for name in ("miou_vs_latency", "miou_vs_size", "channels_per_layer", "samples"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG and f"({name}.png)" in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"compression/miou_vs_latency", "compression/samples"} <= set(events.Tags()["images"])
    assert "benchmark/final/val_miou" in events.Tags()["scalars"]


def _stage(params, ms, size, miou, runtime="torchscript_lite"):
    return {"report": {"params": params, "macs": 2 * params, "runtimes": {runtime: {
        "status": "ok", "median_ms": ms, "size_mb": size}}}, "miou": miou, "techniques": []}


def test_table_rows_give_ratios_and_accuracy_change_in_points():
    from lightning_segcompress.benchmark.report import add_stage

    stages = {}
    for name, args in (("baseline", (4e6, 100.0, 16.0, 0.80)), ("final", (1e6, 20.0, 2.0, 0.795))):
        content = _stage(*args)
        add_stage(stages, name, content["report"])
        stages[name].update(miou=content["miou"], techniques=["quantization"] if name == "final" else [])
    header, rows = stage_rows(stages)
    final = dict(zip(header, rows[1]))
    assert final["lite speedup"] == "5.00x" and final["lite x smaller"] == "8.00x"
    assert final["mIoU change (points)"] == "-0.50" and final["params M"] == "1.000"
    assert final["techniques"] == "quantization" and dict(zip(header, rows[0]))["techniques"] == "none"
    assert final["95% CI (points)"] == "" and final["verdict"] == ""  # no per-image data: no interval
    assert compression_table(stages).count("\n") == 3


def _confusions(wrong: int, images: int = 10):
    """Per-image confusion matrices of 2 classes (mask [0, 0, 1, 1]), every pixel of the first ``wrong`` images
    wrong."""
    masks = torch.tensor([0, 0, 1, 1]).view(1, 1, 4).repeat(images, 1, 1)
    predictions = masks.clone()
    predictions[:wrong] = 1 - predictions[:wrong]
    return confusion_matrices(predictions, masks, 2)


def test_report_gives_the_change_with_interval_verdict_and_iou_per_class(tmp_path):
    from lightning_segcompress.benchmark.report import add_stage

    confusions = {"baseline": _confusions(0), "after_structured_pruning": _confusions(0), "final": _confusions(5)}
    stages = {}
    for name, confusion in confusions.items():
        add_stage(stages, name, _stage(1e6, 10.0, 1.0, None)["report"])
        stages[name].update(miou=miou_from_confusion(confusion), techniques=[])
    statistics = accuracy_statistics(confusions, resamples=200)
    for name, content in statistics.items():
        stages[name].update(content)
    assert statistics["baseline"]["miou_change"] == {"reference": "baseline", "verdict": "reference"}
    assert statistics["after_structured_pruning"]["miou_change"]["verdict"] == "no measurable difference"
    final = statistics["final"]
    assert final["miou_change"]["estimate"] == pytest.approx(100 * (1 / 3 - 1))  # tp = fp = fn per class
    assert final["miou_change"]["high"] < 0 and final["miou_change"]["verdict"] == "worse"
    assert final["per_class_iou"] == pytest.approx([1 / 3, 1 / 3])

    header, rows = stage_rows(stages)
    cells = {row[0]: dict(zip(header, row)) for row in rows}
    low, high = final["miou_change"]["low"], final["miou_change"]["high"]
    assert cells["final"]["mIoU change (points)"] == "-66.67"
    assert cells["final"]["95% CI (points)"] == f"[{low:+.2f}, {high:+.2f}]" and cells["final"]["verdict"] == "worse"
    assert cells["after_structured_pruning"]["95% CI (points)"] == "[+0.00, +0.00]"
    assert cells["baseline"]["verdict"] == "reference"
    assert per_class_table(stages, ["road", "car"]).splitlines()[2:] == [
        "| road | 100.0 | 100.0 | 33.3 |", "| car | 100.0 | 100.0 | 33.3 |"]

    paths = write_compression_report(tmp_path, stages, {"input_shape": [1, 3, 8, 8]}, {}, ["road", "car"])
    markdown = paths["markdown"].read_text()
    assert "| stage | techniques | val mIoU | mIoU change (points) | 95% CI (points) | verdict |" in markdown
    assert "paired bootstrap over the 10 validation images (200 resamples" in markdown
    assert "## IoU per class" in markdown and "| class | baseline | after_structured_pruning | final |" in markdown
    assert "<h2>IoU per class</h2>" in paths["html"].read_text()
    saved = json.loads(paths["json"].read_text())
    assert saved["class_names"] == ["road", "car"]
    assert saved["stages"]["final"]["miou_change"]["verdict"] == "worse"
    assert saved["stages"]["final"]["per_class_iou"] == pytest.approx([1 / 3, 1 / 3])


def test_stages_scored_on_other_images_get_no_interval():
    statistics = accuracy_statistics({"baseline": _confusions(0), "final": _confusions(0, images=6)})
    assert statistics["final"]["miou_change"]["verdict"].startswith("n/a: ")
    assert "same validation images" in statistics["final"]["miou_change"]["verdict"]
    assert accuracy_statistics({"baseline": _confusions(0), "final": _confusions(1)}, resamples=0)["final"][
        "miou_change"]["verdict"] == "n/a: bootstrap_resamples is 0"


def test_conv_widths_match_names_of_float_and_fused_networks():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    float_widths = conv_widths(net)
    assert float_widths == {"0": 8, "3": 4}
    prepared = prepare_network(net, QuantizationConfig(backend="fx", qat=True, example_shape=(2, 3, 16, 16)))
    assert conv_widths(prepared) == float_widths


@pytest.mark.parametrize("kwargs, message", [({"eval_batches": -1}, "eval_batches"), ({"samples": -2}, "samples"),
                                             ({"bootstrap_resamples": 10}, "bootstrap_resamples"),
                                             ({"bootstrap_resamples": -1}, "bootstrap_resamples"),
                                             ({"bootstrap_resamples": 1000.0}, "bootstrap_resamples")])
def test_bad_report_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeviceBenchmark(**kwargs)


def test_int8_network_counts_the_params_and_macs_of_its_float_source():
    from lightning_segcompress.quantization import convert_network
    from lightning_segcompress.utils import count_macs, count_params

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    prepared = prepare_network(net, QuantizationConfig(backend="fx", qat=False, example_shape=(2, 3, 16, 16)))
    prepared(x)
    int8 = convert_network(prepared)
    assert count_params(int8) == count_params(net) - 2 * 8  # BN folded into the conv: its scale and shift go
    assert count_macs(int8, x) == (3 * 9 * 8 + 8 * 4) * 16 * 16  # the convolutions' MACs (BN and ReLU fused)
    # a run resumed from a checkpoint without per-image scores for the baseline: no interval against another stage
    missing = accuracy_statistics({"after_shunt": _confusions(0), "final": _confusions(1)}, reference="baseline")
    assert missing["final"]["miou_change"]["verdict"] == "n/a: no per-image scores for the reference stage 'baseline'"
