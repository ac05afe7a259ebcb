"""Benchmark one network on every requested runtime: export, reload, check outputs, time, measure."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_segcompress.benchmark.accuracy import MAX_MIOU_GAP, EvalSet, compare_accuracy, predict_confusion
from lightning_segcompress.benchmark.profile import profile_runtime
from lightning_segcompress.benchmark.runtimes import canonical_name, get_runtime, is_runtime, runtime_names
from lightning_segcompress.benchmark.timing import measure_latency, num_threads
from lightning_segcompress.memory import TiledInference, memory_report
from lightning_segcompress.utils.inspection import (
    count_macs,
    count_params,
    evaluation_mode,
    extract_logits,
    has_int8_modules,
)

RUNTIMES = runtime_names()  # the registered runtimes when this module was imported
INT8_MEMORY_REASON = ("torch.export cannot trace FX int8 modules; the float stage's 'int8 planned' column estimates "
                      "this arena")
_EVAL_FILE = "eval_inputs.pt"


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to measure. ``isolate`` times exported artifacts in a fresh subprocess per runtime, so that
    their peak memory is their own and not the training process's. ``profile``: time per operator
    (:mod:`~lightning_segcompress.benchmark.profile`) in separate runs after the timed ones. ``max_miou_gap``: the
    largest gap (points) between an exported file's val mIoU and eager's on the same inputs that is not flagged."""

    input_shape: tuple[int, ...] = (1, 3, 512, 512)
    runtimes: tuple[str, ...] = ("eager", "torchscript_lite", "executorch")
    threads: int | None = None
    warmup: int = 3
    runs: int = 10
    tolerance: float = 1e-3
    int8_agreement: float = 0.85  # int8: least share of pixels with eager's class (a broken export: ~1/classes)
    isolate: bool = True
    worker_timeout_s: float = 600.0
    memory: bool = True
    profile: bool = True
    max_miou_gap: float = MAX_MIOU_GAP

    def __post_init__(self) -> None:
        known = runtime_names()
        unknown = [r for r in self.runtimes if not is_runtime(r)]
        if unknown:
            raise ValueError(f"Unknown runtime(s) {unknown}; choose from {list(known)}.")
        if not self.runtimes:
            raise ValueError(f"runtimes is empty; choose one or more of {list(known)}.")
        object.__setattr__(self, "runtimes", tuple(dict.fromkeys(canonical_name(r) for r in self.runtimes)))
        if len(self.input_shape) != 4 or any(int(s) <= 0 for s in self.input_shape):
            raise ValueError(f"input_size must be 4 positive ints (N, C, H, W), got {list(self.input_shape)}.")
        if self.runs <= 0:
            raise ValueError(f"runs must be positive, got {self.runs}.")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}.")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive (or None for torch's default), got {self.threads}.")
        if self.tolerance <= 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}.")
        if not self.max_miou_gap >= 0:
            raise ValueError(f"max_miou_gap must be >= 0 (points), got {self.max_miou_gap}.")

    def as_dict(self) -> dict:
        return asdict(self)


class LogitsOnly(nn.Module):
    """Wraps a network so that it returns only its main logits tensor (exporters need one tensor)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return extract_logits(self.network(x))


@dataclass
class _Job:
    """What every runtime of one benchmark shares besides the model: whether it is int8, and the validation set
    with eager's confusion matrices on it (None: no accuracy)."""

    quantized: bool = False
    evaluation: EvalSet | None = None
    eval_path: Path | None = None
    eager_confusion: torch.Tensor | None = None


def benchmark_network(network: nn.Module, settings: BenchmarkSettings, output_dir: str | Path,
                      evaluation: EvalSet | None = None, export_options: dict[str, dict] | None = None) -> dict:
    """Measure a copy of ``network`` (the original is never modified) on each runtime, and (``settings.memory``)
    its activation memory.

    Returns a JSON-serialisable report: ``params``, ``macs``, ``input_shape``, ``memory`` and per runtime either
    ``{"status": "ok", "median_ms", "p90_ms", "size_mb", "max_abs_diff", "peak_rss_mb", ...}``,
    ``{"status": "skipped", "reason"}`` or ``{"status": "error", "error": {"type", "message"}}``. Errors are
    recorded, never raised.

    With ``settings.profile`` each ok runtime gains ``"profile"`` (time per operator, see
    :mod:`~lightning_segcompress.benchmark.profile`). With an ``evaluation`` set (validation images at the input's
    size, :class:`~lightning_segcompress.benchmark.accuracy.EvalSet`) each ok runtime gains ``"accuracy"``: the
    val mIoU of the runtime's own output (the exported file, run in the isolated worker where ``settings.isolate``)
    against eager's on the same images (:func:`~lightning_segcompress.benchmark.accuracy.compare_accuracy`:
    ``miou``, ``eager_miou``, ``gap_points``, ``flagged`` beyond ``settings.max_miou_gap``), or
    ``{"status": "error", ...}``.

    ``export_options``: keyword options per runtime name for its export (e.g. ``{"onnxruntime": {"dynamic": True}}``,
    see :class:`~lightning_segcompress.benchmark.runtimes.Runtime`).
    """
    output_dir = Path(output_dir)
    export_options = {canonical_name(name): dict(options) for name, options in (export_options or {}).items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    model = LogitsOnly(copy.deepcopy(network).cpu()).eval()
    x = torch.randn(*settings.input_shape, generator=torch.Generator().manual_seed(0))
    report: dict = {"input_shape": list(settings.input_shape), "params": count_params(model), "runtimes": {}}
    try:
        report["macs"] = count_macs(model, x)
    except Exception as err:  # noqa: BLE001 - a counting failure must not lose the latency numbers
        report["macs"] = None
        report["macs_error"] = _error(err)
    try:
        with torch.no_grad(), num_threads(settings.threads):
            reference = model(x)
    except Exception as err:  # noqa: BLE001
        report["runtimes"] = {r: {"status": "error", "error": _error(err)} for r in settings.runtimes}
        return report
    job = _Job(quantized=is_int8(model))
    if evaluation is not None:
        try:
            with num_threads(settings.threads):
                job.eager_confusion = predict_confusion(model, evaluation, settings.input_shape[0])
            job.evaluation = evaluation
            if settings.isolate and any(r != "eager" for r in settings.runtimes):
                job.eval_path = evaluation.save(output_dir / _EVAL_FILE)
        except Exception as err:  # noqa: BLE001
            report["accuracy_error"] = _error(err)
    try:
        for runtime in settings.runtimes:
            try:
                if runtime == "eager":
                    entry = _run_eager(model, x, reference, settings, output_dir, job)
                else:
                    entry = _run_exported(runtime, model, x, reference, settings, output_dir, job,
                                          export_options.get(runtime, {}))
            except Exception as err:  # noqa: BLE001 - recorded in the report, the caller carries on
                entry = {"status": "error", "error": _error(err)}
            report["runtimes"][runtime] = entry
    finally:
        if job.eval_path is not None:
            job.eval_path.unlink(missing_ok=True)
    if settings.memory:
        report["memory"] = _memory(model, x)
    return report


@dataclass(frozen=True)
class TilingSettings:
    """Tiled inference to measure: ``grids`` (``[rows, columns]`` each) and :class:`TiledInference`'s options."""

    grids: tuple[tuple[int, int], ...] = ()
    split_after: str | None = None
    tail: bool = True
    max_stride: int | None = 8

    def __post_init__(self) -> None:
        grids = tuple(tuple(int(g) for g in grid) for grid in (self.grids or ()))
        if any(len(grid) != 2 or min(grid) < 1 for grid in grids):
            raise ValueError(f"tile_grids must be a list of [rows, columns] with positive ints, got {self.grids}.")
        if self.max_stride is not None and self.max_stride < 1:
            raise ValueError(f"tile_max_stride must be >= 1 or None (no limit), got {self.max_stride}.")
        object.__setattr__(self, "grids", grids)

    def options(self) -> dict:
        return {"split_after": self.split_after, "tail": self.tail, "max_stride": self.max_stride}


def benchmark_tiled(network: nn.Module, grid: Sequence[int], settings: BenchmarkSettings, output_dir: str | Path,
                    **tiling) -> dict:
    """:func:`benchmark_network` for ``network`` under :class:`TiledInference` (``tiling``: its keyword options),
    plus ``report["tiling"]``: the grid, the tiled segments, and the largest difference to untiled inference (must be
    within ``settings.tolerance``)."""
    model = LogitsOnly(network)
    tiled = TiledInference(model, settings.input_shape, grid, **tiling)
    x = torch.randn(*settings.input_shape, generator=torch.Generator().manual_seed(0))
    with evaluation_mode(model):
        diff = float((tiled(x) - model(x)).abs().max())
    if not diff <= settings.tolerance:
        raise AssertionError(f"tiled output differs from untiled by {diff:.3g} > tolerance {settings.tolerance:g}")
    report = benchmark_network(tiled, settings, output_dir)
    report["tiling"] = {"grid": list(tiled.plan.grid), "max_abs_diff_to_untiled": diff,
                        "segments": tiled.plan.describe(), "macs_ratio": tiled.plan.macs_ratio}
    return report


def _memory(model: nn.Module, x: torch.Tensor) -> dict:
    """Planner numbers (MB) and eager's measured peak; an untraceable model is recorded, not raised."""
    if has_int8_modules(model):
        return {"status": "skipped", "reason": INT8_MEMORY_REASON}
    try:
        report = memory_report(model, x, top=1)
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "error": _error(err)}
    return {"status": "ok", "naive_mb": report.fp32.naive / 1e6, "planned_mb": report.fp32.planned / 1e6,
            "lower_bound_mb": report.fp32.lower_bound / 1e6, "int8_planned_mb": report.int8.planned / 1e6,
            "measured_peak_mb": report.measured_peak / 1e6, "peak_module": report.fp32.peak_module}


def is_int8(model: nn.Module) -> bool:
    """Whether ``model`` is an int8 conversion: FX int8 modules, or a PT2E graph of quantize/dequantize ops (read
    from the model itself: a deep copy does not carry the compression-stage record)."""
    return has_int8_modules(model) or any(node.op == "call_function" and "quantize_per_" in str(node.target)
               for module in model.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes)


def _run_eager(model, x, reference, settings, output_dir, job: _Job) -> dict:
    with num_threads(settings.threads):
        latency = measure_latency(model, x, settings.warmup, settings.runs)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    entry = {"status": "ok", **latency, "size_mb": weights / 1e6, "size_kind": "weights in memory",
             "max_abs_diff": 0.0, "peak_rss_mb": None}
    if settings.profile:  # after the timed runs
        with num_threads(settings.threads):
            entry["profile"] = profile_runtime("eager", model, "", x, job.quantized)
    if job.eager_confusion is not None:
        entry["accuracy"] = compare_accuracy(job.eager_confusion, job.eager_confusion,
                                             job.evaluation.ignore_index, settings.max_miou_gap)
    return entry


def _run_exported(name: str, model, x, reference, settings, output_dir, job: _Job, options: dict) -> dict:
    runtime = get_runtime(name)
    available, reason = runtime.available()
    if not available:
        return {"status": "skipped", "reason": reason}
    refused = runtime.refuses(model)
    if refused:
        return {"status": "skipped", "reason": refused}
    unknown = sorted(set(options) - set(runtime.export_options))
    if unknown:
        raise ValueError(f"{name} export takes no option(s) {unknown}; it takes {list(runtime.export_options)}")
    info = runtime.export(model, x, output_dir / runtime.artifact, **options)
    program = runtime.load(info["path"], settings.threads)
    return _check_and_time(name, program, info, x, reference, settings, job)


def _check_and_time(runtime: str, program, info: dict, x, reference, settings, job: _Job) -> dict:
    with torch.no_grad():
        output = program(x)
    diff = float((output - reference).abs().max())
    entry = {"status": "ok", "size_mb": info["size_bytes"] / 1e6, "size_kind": "file",
             "max_abs_diff": diff, **{k: v for k, v in info.items() if k != "size_bytes"}}
    quantized = job.quantized or bool(info.get("int8"))  # int8 in the file (e.g. quantized by the runtime's tools)
    agreement = float((output.argmax(1) == reference.argmax(1)).float().mean())
    float_check = info.get("float_check")
    if float_check is not None:  # quantized by the runtime's own tools: no int8 eager to compare with; its float
        # export is checked, and what quantization costs is the agreement and the file's mIoU, reported
        _check_reproduces(runtime, float_check["max_abs_diff"], 1.0, False, settings, " (float, before quantizing)")
    else:
        _check_reproduces(runtime, diff, agreement, quantized, settings)
    if quantized:
        entry["argmax_agreement"] = agreement
    other = info.get("dynamic_check")  # a file with symbolic shapes, checked by its exporter on a second shape
    if other:
        _check_reproduces(runtime, other["max_abs_diff"], other["argmax_agreement"], quantized, settings,
                          f" at input {other['shape']}")
    if quantized and not job.quantized:
        job = dataclasses.replace(job, quantized=True)
    dtype = info.get("delegate_dtype")
    confusion = None
    if settings.isolate:
        timed = _time_in_subprocess(runtime, info["path"], settings, job, dtype)
        evaluated = timed.pop("eval", None)
        entry.update(timed)
        if evaluated is not None:
            confusion = evaluated.get("confusion")
            if confusion is None:
                entry["accuracy"] = {"status": "error", "error": evaluated.get("error", {})}
    else:
        with num_threads(settings.threads):
            entry.update(measure_latency(program, x, settings.warmup, settings.runs), peak_rss_mb=None)
            if settings.profile:  # after the timed runs
                entry["profile"] = profile_runtime(runtime, program, info["path"], x, job.quantized, dtype,
                                                   settings.threads)
            if job.evaluation is not None:
                try:
                    confusion = predict_confusion(program, job.evaluation, settings.input_shape[0])
                except Exception as err:  # noqa: BLE001
                    entry["accuracy"] = {"status": "error", "error": _error(err)}
    if confusion is not None and job.eager_confusion is not None:
        try:
            entry["accuracy"] = compare_accuracy(job.eager_confusion, torch.as_tensor(confusion),
                                                 job.evaluation.ignore_index, settings.max_miou_gap)
        except Exception as err:  # noqa: BLE001
            entry["accuracy"] = {"status": "error", "error": _error(err)}
    return entry


def _check_reproduces(runtime: str, diff: float, agreement: float, quantized: bool, settings: BenchmarkSettings,
                      where: str = "") -> None:
    """Raise unless a file's output matches eager's: within the tolerance or, int8 (whose kernels round differently
    from the reference ops), on at least ``int8_agreement`` of the pixels' classes."""
    if quantized and not agreement >= settings.int8_agreement:
        raise AssertionError(f"{runtime} int8 output{where} predicts the eager class on {agreement:.2%} of the pixels "
                             f"< int8_agreement {settings.int8_agreement:.2%}")
    if not quantized and not diff <= settings.tolerance:
        raise AssertionError(f"{runtime} output{where} differs from eager by {diff:.3g} > tolerance "
                             f"{settings.tolerance:g}")


def _time_in_subprocess(runtime: str, path: str, settings: BenchmarkSettings, job: _Job | None = None,
                        delegate_dtype: str | None = None) -> dict:
    job = job or _Job()
    command = [sys.executable, "-m", "lightning_segcompress.benchmark.worker", runtime, path,
               "--shape", ",".join(str(s) for s in settings.input_shape), "--threads", str(settings.threads or 0),
               "--warmup", str(settings.warmup), "--runs", str(settings.runs)]
    if settings.profile:
        command.append("--profile")
        if job.quantized:
            command.append("--quantized")
        if delegate_dtype is not None:
            command += ["--delegate-dtype", delegate_dtype]
    if job.eval_path is not None:
        command += ["--eval", str(job.eval_path)]
    adapter_module = getattr(get_runtime(runtime).load, "__module__", None)
    if adapter_module and adapter_module != "lightning_segcompress.benchmark.runtimes":
        command += ["--import", adapter_module]  # a third-party runtime registers itself when imported
    result = subprocess.run(command, capture_output=True, text=True, timeout=settings.worker_timeout_s)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"{runtime} timing subprocess failed (exit {result.returncode}): {' | '.join(tail)}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _error(err: BaseException) -> dict:
    text = str(err).strip()
    return {"type": type(err).__name__, "message": text.splitlines()[0][:500] if text else ""}

