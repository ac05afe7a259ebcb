"""DeviceBenchmark's operator profile and the val mIoU of the exported files themselves."""

import contextlib
import io
import json
import subprocess
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_segcompress import SyntheticScenesDataModule
from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network
from lightning_segcompress.benchmark import runner as runner_module
from lightning_segcompress.benchmark import worker as worker_module
from lightning_segcompress.benchmark.accuracy import EvalSet, compare_accuracy, fit_to_input, predict_confusion
from lightning_segcompress.benchmark.executorch_runtime import executorch_available
from lightning_segcompress.benchmark.profile import (
    DELEGATE_BLOCK,
    etdump_profile,
    torch_op_dtype,
    xnnpack_op_dtype,
)
from lightning_segcompress.benchmark.report import accuracy_rows, add_stage, profile_section
from lightning_segcompress.callbacks import DeviceBenchmark
from lightning_segcompress.models import SegmentationModule
from lightning_segcompress.utils.statistics import miou_from_confusion, per_image_confusion
from support.common import trainer_kwargs

HAS_EXECUTORCH = executorch_available()[0]
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH, reason="executorch is not installed")
SHAPE = (1, 3, 32, 32)


def _tiny_net(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, classes, 1)).eval()


def _batches(count=2, size=32, classes=3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, size, size, generator=generator),
             torch.randint(0, classes, (2, size, size), generator=generator)) for _ in range(count)]


def _settings(runtimes, isolate):
    return BenchmarkSettings(input_shape=SHAPE, runtimes=runtimes, warmup=1, runs=2, isolate=isolate, memory=False)


def _worker_in_this_process(command, **kwargs):
    """subprocess.run for the timing worker, run in this process: the same command line and code path without a
    fresh interpreter's imports (tens of seconds on small CI machines); test_device_benchmark runs a real one."""
    assert command[1:3] == ["-m", "lightning_segcompress.benchmark.worker"], command
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        worker_module.main(command[3:])
    _worker_in_this_process.commands.append(command)
    return subprocess.CompletedProcess(command, 0, stdout.getvalue(), "")


@pytest.fixture(scope="module")
def float_report(tmp_path_factory):
    """A tiny float net on every runtime, exported files timed, profiled and scored by the isolated worker."""
    runtimes = ("eager", "torchscript_lite", "executorch") if HAS_EXECUTORCH else ("eager", "torchscript_lite")
    batches = _batches()
    evaluation = EvalSet.from_batches(batches, SHAPE)
    out = tmp_path_factory.mktemp("float")
    _worker_in_this_process.commands = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "subprocess", SimpleNamespace(run=_worker_in_this_process))
        report = benchmark_network(_tiny_net(), _settings(runtimes, isolate=True), out, evaluation=evaluation)
    return report, batches, out


def test_worker_is_asked_for_profile_and_score(float_report):
    commands = _worker_in_this_process.commands
    assert [c[3] for c in commands] == [r for r in float_report[0]["runtimes"] if r != "eager"]
    for command in commands:
        assert "--profile" in command and "--quantized" not in command
        assert command[command.index("--eval") + 1].endswith("eval_inputs.pt")
    if HAS_EXECUTORCH:
        assert commands[-1][commands[-1].index("--delegate-dtype") + 1] == "float"


@pytest.mark.parametrize("runtime", ["eager", "torchscript_lite", "executorch"])
def test_profile_present_for_every_runtime(float_report, runtime):
    report, _, _ = float_report
    if runtime not in report["runtimes"]:
        pytest.skip("executorch is not installed")
    entry = report["runtimes"][runtime]
    assert entry["status"] == "ok", entry
    profile = entry["profile"]
    assert profile["status"] == "ok", profile
    ops = profile["ops"]
    assert ops and profile["runs"] >= 1 and profile["total_ms"] > 0
    assert sum(o["share"] for o in ops) == pytest.approx(1.0)
    assert [o["total_ms"] for o in ops] == sorted((o["total_ms"] for o in ops), reverse=True)
    assert set(ops[0]) == {"op", "calls", "total_ms", "share", "delegated", "dtype"}
    assert profile["float_islands"] is None  # a float network has no float islands
    assert not any(o["dtype"] == "int8" for o in ops)
    if runtime == "executorch":
        assert any(o["delegated"] and o["dtype"] == "float" and "Convolution" in o["op"] for o in ops), ops
        assert profile["not_delegated"] == []
        assert entry["ops"] and all(o["delegated"] and o["dtype"] == "float" for o in entry["ops"])
    else:
        assert all(o["delegated"] is None for o in ops)
        assert any("conv" in o["op"] and o["dtype"] == "float" for o in ops), ops


@pytest.mark.parametrize("runtime", ["eager", "torchscript_lite", "executorch"])
def test_exported_file_miou_equals_eager_on_a_float_net(float_report, runtime):
    report, batches, out = float_report
    if runtime not in report["runtimes"]:
        pytest.skip("executorch is not installed")
    accuracy = report["runtimes"][runtime]["accuracy"]
    assert accuracy["images"] == 4 and accuracy["identical"], accuracy
    assert accuracy["miou"] == accuracy["eager_miou"] and accuracy["gap_points"] == 0 and not accuracy["flagged"]
    # the images already have the input size: eager's score is the project's usual one on these batches
    expected = miou_from_confusion(per_image_confusion(_tiny_net(), batches), 255)
    assert accuracy["eager_miou"] == pytest.approx(expected, abs=1e-6)
    assert not (out / "eval_inputs.pt").exists()  # the temporary validation set is removed


def test_in_process_profile_and_score_without_isolation(tmp_path):
    evaluation = EvalSet.from_batches(_batches(), SHAPE)
    report = benchmark_network(_tiny_net(), _settings(("eager", "torchscript_lite"), isolate=False), tmp_path,
                               evaluation=evaluation)
    lite = report["runtimes"]["torchscript_lite"]
    assert lite["profile"]["status"] == "ok" and lite["profile"]["ops"]
    assert lite["accuracy"]["identical"] and not lite["accuracy"]["flagged"]


class CumsumHead(nn.Module):
    """cumsum has no XNNPACK kernel: it stays on ExecuTorch's portable kernels, in float."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return torch.cumsum(self.conv2(torch.relu(self.conv1(x))), 1)


@needs_executorch
def test_executorch_profile_marks_int8_ops_and_portable_float_islands(tmp_path):
    from lightning_segcompress.quantization import QuantizationConfig, calibrate, convert_network, prepare_network

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    prepared = prepare_network(CumsumHead().eval(), QuantizationConfig(backend="pt2e", qat=False,
                                                                       example_shape=(2, 3, 32, 32)))
    calibrate(prepared, [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(2)])
    int8 = convert_network(prepared)
    entry = benchmark_network(int8, _settings(("executorch",), isolate=False), tmp_path)["runtimes"]["executorch"]
    assert entry["status"] == "ok", entry
    profile = entry["profile"]
    assert profile["status"] == "ok" and profile["quantized"], profile
    delegated = [o for o in profile["ops"] if o["delegated"]]
    assert any(o["dtype"] == "int8" and "Convolution" in o["op"] for o in delegated), delegated
    assert not any(o["dtype"] == "float" for o in delegated)  # the whole delegate runs int8
    assert [o["op"] for o in profile["not_delegated"]] == ["cumsum.out"]
    assert profile["not_delegated"][0]["dtype"] == "float"
    assert [o["op"] for o in profile["float_islands"]] == ["cumsum.out"]
    # the lowered graph's composition says the same
    assert {(o["op"], o["delegated"], o["dtype"]) for o in entry["ops"]} == {
        ("aten.convolution.default", True, "int8"), ("aten.relu.default", True, "int8"),
        ("aten.cumsum.default", False, "float")}
    assert entry["quantized"] and [o["op"] for o in entry["float_islands"]] == ["aten.cumsum.default"]
    stages = {}
    add_stage(stages, "final", {"runtimes": {"executorch": entry}})
    section = profile_section(stages)
    assert "| Convolution (NHWC, QC8) IGEMM |" in section or "QC8" in section
    assert "Not delegated (portable kernels): `cumsum.out`" in section
    assert "Float islands in the int8 model: `cumsum.out`" in section


def test_op_dtypes_from_names():
    assert xnnpack_op_dtype("Convolution (NHWC, QC8) IGEMM") == "int8"
    assert xnnpack_op_dtype("Fully Connected (NC, QS8, QC8W) GEMM") == "int8"
    assert xnnpack_op_dtype("Transpose (ND, X8)") == "int8"
    assert xnnpack_op_dtype("Convolution (NHWC, F32) IGEMM") == "float"
    assert xnnpack_op_dtype("Transpose (ND, X32)") == "float"
    assert xnnpack_op_dtype("Convert (NC)") is None and xnnpack_op_dtype("Convert (NC, F32, QD8)") is None
    assert xnnpack_op_dtype("Multiply (ND)") is None and xnnpack_op_dtype("Multiply (ND)", "int8") == "int8"
    assert torch_op_dtype("quantized::conv2d_relu", ["c10::quint8", "", "Scalar"]) == "int8"
    assert torch_op_dtype("aten::clone", ["c10::quint8", "Scalar"]) == "int8"
    assert torch_op_dtype("aten::upsample_bilinear2d", ["float", "", "Scalar"]) == "float"
    assert torch_op_dtype("aten::dequantize", ["c10::quint8"]) is None
    assert torch_op_dtype("aten::empty", ["ScalarList", "Scalar"]) is None


def _event(name, raw, delegated=False):
    return SimpleNamespace(name=name, is_delegated_op=delegated, perf_data=SimpleNamespace(raw=raw))


def test_etdump_without_delegate_op_times_reports_the_delegate_as_a_block():
    block = SimpleNamespace(events=[_event("DELEGATE_CALL", [9.0, 2.0, 2.0]),
                                    _event("native_call_cumsum.out", [5.0, 1.0, 1.0]),
                                    _event("OPERATOR_CALL", [5.1, 1.1, 1.1]),
                                    _event("Method::execute", [15.0, 3.2, 3.2])])
    profile = etdump_profile([SimpleNamespace(events=[_event("Method::init", [1.0])]), block], quantized=True,
                             delegate_dtype="int8")
    assert profile["runs"] == 2 and profile["total_ms"] == pytest.approx(3.2)  # the warm-up run is left out
    assert [(o["op"], o["delegated"], o["dtype"], o["calls"]) for o in profile["ops"]] == [
        (DELEGATE_BLOCK, True, "int8", 1), ("cumsum.out", False, "float", 1)]
    assert profile["ops"][0]["total_ms"] == pytest.approx(2.0) and profile["ops"][0]["share"] == pytest.approx(2 / 3)
    assert any("timed as a block" in note for note in profile["notes"])
    # with delegate-internal events, the call's remaining time is the delegate's overhead
    block.events[:0] = [_event("Convolution (NHWC, QC8) IGEMM #1", [6.0, 1.5, 1.5], delegated=True),
                        _event("Mean (ND) #1", [1.0, 0.25, 0.25], delegated=True)]
    ops = {o["op"]: o for o in etdump_profile([block], quantized=True, delegate_dtype="int8")["ops"]}
    assert ops["Convolution (NHWC, QC8) IGEMM"]["dtype"] == "int8" and ops["Mean (ND)"]["dtype"] == "int8"
    assert ops["XNNPACK delegate call overhead"]["total_ms"] == pytest.approx(0.25)


def test_gap_between_exported_file_and_eager_is_flagged():
    eager = torch.zeros(2, 2, 2, dtype=torch.int64)
    eager[:, 0, 0], eager[:, 1, 1] = 50, 50  # every pixel right: mIoU 1
    assert compare_accuracy(eager, eager.clone())["flagged"] is False
    worse = eager.clone()
    worse[0, 1, 1], worse[0, 1, 0] = 49, 1  # one pixel of 200 wrong: mIoU 0.9900, a gap of -0.995 points
    result = compare_accuracy(eager, worse)
    assert result["flagged"] and result["gap_points"] == pytest.approx(-100 * (1 - miou_from_confusion(worse)))
    assert not compare_accuracy(eager, worse, max_gap=2.0)["flagged"]
    with pytest.raises(ValueError, match="shape"):
        compare_accuracy(eager, eager[:1])
    stages = {}
    add_stage(stages, "final", {"runtimes": {"executorch": {"status": "ok", "accuracy": result}}})
    header, rows = accuracy_rows(stages)
    assert header[-1] == "flag" and rows[0][-1] == "GAP > 0.2" and rows[0][5] == "-1.00"


def test_eval_set_fits_images_to_the_input_and_round_trips(tmp_path):
    batches = _batches(count=1, size=40)
    evaluation = EvalSet.from_batches(batches, SHAPE)
    assert evaluation.images[0].shape == (3, 32, 32) and evaluation.masks[0].shape == (40, 40)
    assert torch.equal(evaluation.images[1], fit_to_input(batches[0][0], (32, 32))[1])
    loaded = EvalSet.load(evaluation.save(tmp_path / "eval.pt"))
    assert len(loaded) == 2 and loaded.ignore_index == 255
    assert all(torch.equal(a, b) for a, b in zip(loaded.images + loaded.masks, evaluation.images + evaluation.masks))
    # a static batch of 3 for 2 images: padded, the padding's outputs dropped
    net = _tiny_net()
    assert torch.equal(predict_confusion(net, loaded, batch_size=3), predict_confusion(net, loaded, batch_size=1))


def test_device_benchmark_reports_profile_and_file_miou_and_warns_on_a_gap(tmp_path, monkeypatch):
    real = runner_module.predict_confusion

    def wrong_file(program, evaluation, batch_size=1, num_classes=None):
        confusion = real(program, evaluation, batch_size, num_classes)
        if isinstance(program, nn.Module):  # eager
            return confusion
        moved = torch.zeros_like(confusion)
        moved[..., 0] = confusion.sum(-1)  # the exported file predicts class 0 everywhere
        return moved

    monkeypatch.setattr(runner_module, "predict_confusion", wrong_file)
    data = SyntheticScenesDataModule(num_classes=3, image_size=(32, 32), num_train=4, num_val=4, batch_size=2)
    bench = DeviceBenchmark(input_size=[32, 32], runtimes=["eager", "torchscript_lite"], warmup=0, runs=1,
                            isolate=False, memory=False, samples=0, bootstrap_resamples=0, eval_batches=1,
                            output_dir=str(tmp_path / "bench"))
    module = SegmentationModule(network=_tiny_net().train(), num_classes=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[bench]))
    with pytest.warns(UserWarning, match="exported file scores val mIoU"):
        trainer.fit(module, datamodule=data)

    final = bench.stages["final"]["report"]["runtimes"]
    assert final["eager"]["accuracy"]["images"] == 2  # eval_batches=1 of batch size 2
    assert final["eager"]["accuracy"]["eager_miou"] == pytest.approx(bench.stages["final"]["miou"], abs=1e-6)
    assert final["torchscript_lite"]["accuracy"]["flagged"]
    assert final["torchscript_lite"]["profile"]["ops"]
    out = tmp_path / "bench"
    markdown = (out / "benchmark.md").read_text()
    assert "## Exported-file accuracy" in markdown and "| final | torchscript_lite | 2 |" in markdown
    assert "GAP > 0.2" in markdown and "## Operator profile" in markdown and "### final / torchscript_lite" in markdown
    report = (out / "compression_report.md").read_text()
    assert "## Exported-file accuracy" in report and "## Operator profile" in report
    assert "<h2>Operator profile</h2>" in (out / "compression_report.html").read_text()
    saved = json.loads((out / "compression_report.json").read_text())["stages"]["final"]["exported"]
    assert saved["torchscript_lite"]["accuracy"]["flagged"] and len(saved["torchscript_lite"]["top_ops"]) <= 10
