"""The runtime registry: one adapter per runtime, used by the benchmark, its worker process, the export bundle and
the latency model; a third-party runtime is one ``register_runtime`` call."""

import pytest
import torch
from torch import nn

from lightning_segcompress.benchmark import BenchmarkSettings, benchmark_network
from lightning_segcompress.benchmark import runtimes as registry
from lightning_segcompress.benchmark.runtime_timer import RuntimeTimer
from lightning_segcompress.benchmark.runtimes import Runtime, get_runtime, register_runtime, runtime_for_file
from lightning_segcompress.export.bundle import check_output_path
from support.common import subprocess_env

FAST = dict(input_shape=(1, 3, 16, 16), warmup=0, runs=1, memory=False, profile=False)


@pytest.fixture
def pt2_runtime(monkeypatch):
    """A third-party runtime (torch.export's .pt2 files), registered for one test only; worker processes find it
    through ``tests/`` on their path."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])
    from support import pt2_runtime

    pt2_runtime.register()
    return get_runtime("torch_export")


def test_builtin_runtimes_suffixes_and_aliases():
    assert registry.runtime_names()[:4] == ("eager", "torchscript_lite", "executorch", "onnxruntime")
    assert get_runtime("onnx") is get_runtime("onnxruntime") and get_runtime("onnx").artifact == "model.onnx"
    assert runtime_for_file("a/b/model.pte").name == "executorch" and runtime_for_file("m.ptl").name == \
        "torchscript_lite"
    assert check_output_path("onnx", None).name == "model.onnx"
    assert BenchmarkSettings(runtimes=("eager", "onnx")).runtimes == ("eager", "onnxruntime")
    with pytest.raises(ValueError, match=r"Unknown runtime 'tflite'; choose one of \['eager'"):
        get_runtime("tflite")
    with pytest.raises(ValueError, match="no runtime writes .tflite files"):
        runtime_for_file("model.tflite")
    with pytest.raises(ValueError, match="writes no file"):
        _ = get_runtime("eager").artifact


def test_a_registered_runtime_is_benchmarked_in_a_worker_and_times_layers(pt2_runtime, tmp_path):
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    report = benchmark_network(network, BenchmarkSettings(runtimes=("eager", "pt2"), **FAST), tmp_path)
    entry = report["runtimes"]["torch_export"]
    assert entry["status"] == "ok", entry
    assert entry["method"] == "torch.export.save" and entry["max_abs_diff"] <= 1e-5
    assert entry["median_ms"] > 0 and entry["peak_rss_mb"] > 0  # timed in the worker process
    assert (tmp_path / "model.pt2").is_file()
    assert RuntimeTimer("pt2").time_module(network, torch.randn(1, 3, 16, 16)) > 0  # the latency model's timer
    assert check_output_path("torch_export", None).name == "model.pt2"  # the export bundle knows its suffix
    with pytest.raises(ValueError, match="already registered"):
        register_runtime(Runtime("torch_export", "again", ".pt2"))
    refused = benchmark_network(network, BenchmarkSettings(runtimes=("pt2",), isolate=False, **FAST), tmp_path,
                                export_options={"pt2": {"dynamic": True}})["runtimes"]["torch_export"]
    assert refused["status"] == "error"
    assert "torch_export export takes no option(s) ['dynamic']" in refused["error"]["message"]


def test_a_runtime_that_refuses_a_model_is_skipped_with_its_reason(tmp_path):
    from lightning_segcompress.quantization import QuantizationConfig, calibrate, convert_network, prepare_network

    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    prepared = prepare_network(network, QuantizationConfig(backend="fx", qat=False, example_shape=(2, 3, 16, 16)))
    calibrate(prepared, [torch.randn(2, 3, 16, 16)])
    report = benchmark_network(convert_network(prepared),
                               BenchmarkSettings(runtimes=("executorch", "onnx"), isolate=False, **FAST), tmp_path)
    assert "quantize with backend pt2e for ExecuTorch" in report["runtimes"]["executorch"]["reason"]
    assert "FX int8 modules have no ONNX export" in report["runtimes"]["onnxruntime"]["reason"]
