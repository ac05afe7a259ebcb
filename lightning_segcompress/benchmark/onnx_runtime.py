"""Export a segmentation net to ONNX (``torch.onnx``'s dynamo exporter, one self-contained file) and run, profile and
statically quantize it with ONNX Runtime.

Pure torch + onnx/onnxruntime/onnxscript, an optional extra (``pip install 'lightning-segcompress[onnx]'``)
imported lazily: this module imports fine without it; :func:`onnx_available` says whether it can be used.

* A float network becomes a float graph; a PT2E int8 network (``quantize_per_*`` / ``dequantize_per_*`` around float
  ops, the converted QAT/PTQ model) becomes a QDQ graph (``QuantizeLinear`` / ``DequantizeLinear`` with the scales
  and zero points training learned, int8 weights stored as int8): ONNX Runtime, TensorRT and OpenVINO fuse those
  patterns into int8 kernels. torch.ao FX int8 modules have no ONNX path.
* :func:`quantize_static_onnx`: a float file -> a QDQ file with ONNX Runtime's static quantization (per-channel s8
  weights, u8 activations), calibrated on the caller's images.
* :func:`profile_onnx`: ONNX Runtime's own profiler (per-node kernel times) as a profile dict of
  :mod:`~lightning_segcompress.benchmark.profile`; int8 are the nodes with an 8-bit input other than the Q/DQ
  conversions themselves.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = ["DEFAULT_OPSET", "OnnxProgram", "export_onnx", "onnx_available", "onnx_refuses", "profile_onnx",
           "quantize_static_onnx"]

DEFAULT_OPSET = 18
INSTALL_HINT = "pip install 'lightning-segcompress[onnx]'"
_CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_EIGHT_BIT = {"int8", "uint8"}


def onnx_available() -> tuple[bool, str]:
    """``(True, "")`` when onnx, onnxscript (the exporter's) and onnxruntime import, else ``(False, reason)``."""
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except Exception as err:  # noqa: BLE001 - a broken install is as unusable as a missing one
            return False, f"{package} is not installed: {INSTALL_HINT} ({type(err).__name__}: {err})"
    return True, ""


def onnx_refuses(model: nn.Module) -> str | None:
    """Why ``model`` has no ONNX export here (None: it has one)."""
    from lightning_segcompress.utils.inspection import has_int8_modules

    if has_int8_modules(model):
        return ("torch.ao FX int8 modules have no ONNX export; quantize with backend pt2e (its QAT/PTQ checkpoint "
                "exports as QDQ ONNX) or export the float network with --quantize")
    return None


def _dynamic_shapes(dynamic: bool):
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO  # dynamic where the network allows it, static where it must be
    return ({0: auto, 2: auto, 3: auto},)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = DEFAULT_OPSET,
                dynamic: bool = False, calibration: Iterable[torch.Tensor] | None = None) -> dict:
    """``model`` (one tensor in, one out) -> an ONNX file at ``path`` with its weights inside.

    ``dynamic``: batch, height and width are symbolic where the network allows it (checked on a second shape).
    ``calibration``: images for :func:`quantize_static_onnx`; then the file written is the statically quantized
    QDQ model of the float export, and ``float_check`` records how far the float export was from ``model``.
    Returns ``{"path", "size_bytes", "method", "opset", "ops", "dynamic", "int8", "notes"}`` (``ops``: ONNX node
    types and counts); raises with the exporter's message when it fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    notes: list[str] = []
    target = path if calibration is None else path.with_name(f".{path.stem}.float.onnx")
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["x"],
                                        output_names=["logits"], dynamic_shapes=_dynamic_shapes(dynamic),
                                        external_data=False, report=False, verbose=False)
            program.save(str(target), external_data=False)
        float_check = None
        if calibration is not None:
            with torch.no_grad():
                float_check = {"max_abs_diff": float((OnnxProgram(target)(example) - model(example)).abs().max())}
            quantize_static_onnx(target, path, calibration)
            notes.append("statically quantized with ONNX Runtime (QDQ, per-channel s8 weights, u8 activations)")
    finally:
        if target != path:
            target.unlink(missing_ok=True)
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    info = {"path": str(path), "size_bytes": path.stat().st_size, "method": "torch.onnx (dynamo)", "opset": opset,
            "ops": dict(ops.most_common()), "dynamic": bool(dynamic), "int8": "QuantizeLinear" in ops, "notes": notes}
    if float_check is not None:
        info["float_check"] = float_check
    if dynamic:
        info["dynamic_check"] = _check_other_shape(model, example, path)
    return info


def _check_other_shape(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    """The file against ``model`` on a batch one larger and 32 pixels taller and wider than ``example``."""
    n, c, h, w = example.shape
    x = torch.randn(n + 1, c, h + 32, w + 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    output = OnnxProgram(path)(x)
    if output.shape != reference.shape:
        raise RuntimeError(f"the dynamic ONNX file returns {list(output.shape)} for input {list(x.shape)}, eager "
                           f"{list(reference.shape)}")
    return {"shape": list(x.shape), "max_abs_diff": float((output - reference).abs().max()),
            "argmax_agreement": float((output.argmax(1) == reference.argmax(1)).float().mean())}


def _session_options(threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


class OnnxProgram:
    """An ONNX file loaded in ONNX Runtime (CPU provider), callable like the module: tensor in, tensor out."""

    def __init__(self, path: str | Path, num_threads: int | None = None, *, profile_prefix: str | None = None):
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(self.path, _session_options(num_threads, profile_prefix),
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


class _CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader over a list of image batches."""

    def __init__(self, input_name: str, images: Iterable[torch.Tensor]):
        self._batches = iter([{input_name: img.detach().cpu().float().contiguous().numpy()} for img in images])

    def get_next(self):
        return next(self._batches, None)


def quantize_static_onnx(float_path: str | Path, output: str | Path, images: Iterable[torch.Tensor],
                         per_channel: bool = True) -> Path:
    """A float ONNX file -> a static QDQ int8 file (s8 weights, per channel; u8 activations), calibrated (min-max)
    on ``images`` (``[N, C, H, W]`` batches at the file's input shape)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = list(images)
    if not images:
        raise ValueError("quantize_static_onnx needs at least one calibration batch.")
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="segcompress-onnx-q-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            input_name = OnnxProgram(prepared).input_name
            quantize_static(str(prepared), str(output), _CalibrationReader(input_name, images),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return output


# ---- profile: ONNX Runtime's profiler ------------------------------------------------------------------------------

def onnx_node_dtype(op: str, input_types: list[str]) -> str | None:
    """int8 / float / None (a Q/DQ conversion, or no typed input) of one profiled ONNX Runtime node."""
    if op in _CONVERSIONS:
        return None
    if any(t in _EIGHT_BIT for t in input_types):
        return "int8"
    if any(t.startswith("float") or t in ("double", "bfloat16") for t in input_types):
        return "float"
    return None


def profile_onnx(path: str | Path, x: torch.Tensor, runs: int | None = None, quantized: bool = False,
                 threads: int | None = None) -> dict:
    """Per-node kernel times of the ONNX file at ``path`` on ``x`` over ``runs`` calls after one warm-up call (a
    separate session with profiling on; the timed session never has it). Ops are ONNX Runtime's kernels after its
    graph optimizations (e.g. ``QLinearConv`` where it fused a QDQ pattern)."""
    from lightning_segcompress.benchmark.profile import PROFILE_RUNS, _op_times, float_islands_of

    runs = PROFILE_RUNS if runs is None else runs
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    with tempfile.TemporaryDirectory(prefix="segcompress-ortprof-") as tmp:
        program = OnnxProgram(path, threads, profile_prefix=os.path.join(tmp, "ort"))
        for _ in range(runs + 1):
            program(x)
        events = json.loads(Path(program.session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e.get("ts", 0))
    warm_end = model_runs[0].get("ts", 0) + model_runs[0].get("dur", 0) if model_runs else -1
    model_runs = model_runs[1:]  # the first call is the warm-up
    totals: dict = defaultdict(lambda: [0, 0.0])
    for event in events:
        if (event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time")
                or event.get("ts", 0) <= warm_end):
            continue
        args = event.get("args") or {}
        op = args.get("op_name", event["name"])
        types = [t for shape in args.get("input_type_shape") or [] for t in shape]
        entry = totals[(op, None, onnx_node_dtype(op, types))]
        entry[0] += 1
        entry[1] += float(event.get("dur", 0)) / 1000.0
    count = len(model_runs) or runs
    ops = _op_times(totals, count)
    total_ms = (sum(float(e.get("dur", 0)) for e in model_runs) / 1000.0 / count if model_runs
                else sum(o["total_ms"] for o in ops))
    notes = ["ops are ONNX Runtime kernels after its graph optimizations; int8 = an 8-bit input"]
    if quantized and not any(o["dtype"] == "int8" for o in ops):
        notes.append("no int8 kernel ran: ONNX Runtime did not fuse the Q/DQ pairs on this CPU")
    return {"status": "ok", "runtime": "onnxruntime", "source": "ONNX Runtime profiler (kernel time per node)",
            "runs": count, "total_ms": total_ms, "quantized": quantized, "ops": ops,
            "not_delegated": None, "float_islands": float_islands_of(ops) if quantized else None, "notes": notes}
