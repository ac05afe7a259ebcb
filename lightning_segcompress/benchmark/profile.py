"""Time per operator of a network on each runtime: which ops cost the most, which ones ExecuTorch left to its
portable (non-delegated) kernels, and which ones still compute in float in an int8 model. Pure torch (executorch
imported lazily).

A profile is a plain dict (JSON-serialisable, kept in ``benchmark.json``)::

    {"status": "ok", "runtime", "source", "runs", "total_ms", "quantized",
     "ops": [{"op", "calls", "total_ms", "share", "delegated", "dtype"}, ...],   # most expensive first
     "not_delegated": [...] | None, "float_islands": [...] | None, "notes": [...]}

per op: ``calls`` and ``total_ms`` per inference (mean over the profiled runs), ``share`` of the ops' summed time,
``delegated`` (ExecuTorch: True inside the XNNPACK delegate, False on a portable kernel; None on other runtimes)
and ``dtype`` (``"int8"``, ``"float"`` or None where the op moves or converts data, or its type is not known).
``not_delegated`` (ExecuTorch only) lists the ops outside the delegate; ``float_islands`` (quantized networks only,
else None) the ops that compute in float in an int8 model.

Profiling runs are separate from, and after, the timed runs: the latency numbers are never taken under a
profiler.

* eager and TorchScript lite: :func:`profile_torch`, ``torch.profiler`` around a few calls; ops are aten /
  quantized ops by *self* CPU time, each op split by the data type of its inputs (``quantized::*`` kernels and ops on
  quantized tensors are int8; ``quantize_per_*`` / ``dequantize`` are conversions, dtype None). Float islands are
  the top-level (graph) ops of an int8 model whose inputs are float, timed inclusively.
* ExecuTorch: :func:`profile_executorch`, the runtime's event tracer (ETDump, ``load_program(...,
  enable_etdump=True)``) read with ``executorch.devtools.Inspector``. The pip build of ExecuTorch (1.5) has the event
  tracer and the XNNPACK delegate reports its own operators into it (``XNNProfiler``: XNNPACK operator names such
  as ``Convolution (NHWC, QC8) IGEMM``, timed in microseconds by XNNPACK), so delegated ops are timed one by one;
  their dtype comes from XNNPACK's type tag (``F32``/``F16``/``X32``: float; ``QS8``/``QU8``/``QC8``/``QD8``/``X8``:
  int8; ``Convert``: a float<->int8 conversion). An op whose name has no tag (``Mean (ND)``, ``Multiply (ND)``)
  gets ``delegate_dtype``, the dtype of every compute op in the lowered graph where they all agree (see
  :func:`~lightning_segcompress.benchmark.executorch_runtime.export_executorch`'s ``ops``). Time the delegate call
  spends outside XNNPACK's operators (copying inputs and outputs) is the op ``XNNPACK delegate call overhead``;
  XNNPACK times whole microseconds, so very short ops read 0 and their rounding ends up in that overhead too.
  A build whose delegate does not report its operators gets one op ``XNNPACK delegate (whole call)`` per call,
  and the delegate's op composition is then only in the export's ``ops``. Ops outside the delegate are the portable
  kernels (``native_call_<op>`` events), reported as ``<op>`` with ``delegated=False``; they compute in float (an
  int8 model dequantizes before them), except the ``quantize``/``dequantize`` conversions themselves.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["OpTime", "PROFILE_RUNS", "etdump_profile", "float_islands_of", "profile_executorch", "profile_runtime",
           "profile_torch", "top_ops"]

PROFILE_RUNS = 3  # profiled calls after one untimed warm-up call
TOP = 10

DELEGATE_BLOCK = "XNNPACK delegate (whole call)"
DELEGATE_OVERHEAD = "XNNPACK delegate call overhead"
_ET_FRAMEWORK_EVENTS = {"Method::execute", "Method::init", "Program::load_method", "OPERATOR_CALL"}


@dataclass(frozen=True)
class OpTime:
    """One operator's time per inference; see the module docstring."""

    op: str
    calls: int
    total_ms: float
    share: float
    delegated: bool | None = None
    dtype: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _op_times(totals: dict[tuple[str, bool | None, str | None], list[float]], runs: int,
              grand: float | None = None) -> list[dict]:
    """``{(op, delegated, dtype): [calls, summed ms]}`` over ``runs`` runs -> OpTime dicts, most expensive first;
    shares of ``grand`` (summed ms over the runs; default: the sum of ``totals``)."""
    grand = sum(ms for _, ms in totals.values()) if grand is None else grand
    ops = [OpTime(op=op, calls=round(calls / runs), total_ms=ms / runs, share=ms / grand if grand > 0 else 0.0,
                  delegated=delegated, dtype=dtype)
           for (op, delegated, dtype), (calls, ms) in totals.items()]
    ops.sort(key=lambda o: (-o.total_ms, o.op))
    return [o.as_dict() for o in ops]


def top_ops(profile: dict | None, n: int = TOP) -> list[dict]:
    """The ``n`` most expensive ops of a profile ([] without one)."""
    if not profile or profile.get("status") != "ok":
        return []
    return list(profile.get("ops", []))[:n]


def float_islands_of(ops: list[dict]) -> list[dict]:
    """The float ops among ``ops`` (most expensive first): in an int8 model, the float islands."""
    return [dict(o) for o in ops if o.get("dtype") == "float"]


# ---- eager and TorchScript lite: torch.profiler ------------------------------------------------------------------

_CONVERSIONS = {"aten::quantize_per_tensor", "aten::quantize_per_channel", "aten::quantize_per_tensor_dynamic",
                "aten::dequantize", "aten::fake_quantize_per_tensor_affine",
                "aten::fake_quantize_per_channel_affine"}
_QUANTIZED_TYPES = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4", "signed char", "unsigned char")
_FLOAT_TYPES = {"float", "double", "c10::Half", "c10::BFloat16", "c10::complex<float>"}


def torch_op_dtype(name: str, input_dtypes: list[str] | None) -> str | None:
    """int8 / float / None (a conversion, or no tensor input) of one profiled torch op, from its name and the
    data types the profiler recorded for its inputs."""
    if name in _CONVERSIONS or name.startswith("quantized_decomposed::"):
        return None
    if name.startswith("quantized::"):
        return "int8"
    types = [t for t in (input_dtypes or []) if t]
    if any(any(q in t for q in _QUANTIZED_TYPES) for t in types):
        return "int8"
    if any(t in _FLOAT_TYPES for t in types):
        return "float"
    return None


def profile_torch(program: Callable[[torch.Tensor], object], x: torch.Tensor, runs: int = PROFILE_RUNS,
                  quantized: bool = False, runtime: str = "eager") -> dict:
    """Profile ``program(x)`` (an eager module or a lite-interpreter module) with ``torch.profiler`` over ``runs``
    calls after one warm-up call: ops by self CPU time, split by input dtype; for a ``quantized`` network also
    the float islands (top-level ops on float inputs, inclusive time)."""
    from torch.profiler import ProfilerActivity, profile

    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    with torch.no_grad():
        program(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(runs):
                program(x)
    totals: dict = defaultdict(lambda: [0, 0.0])
    islands: dict = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        dtype = torch_op_dtype(event.name, getattr(event, "input_dtypes", None))
        entry = totals[(event.name, None, dtype)]
        entry[0] += 1
        entry[1] += event.self_cpu_time_total / 1000.0
        if quantized and dtype == "float" and event.cpu_parent is None:
            island = islands[(event.name, None, dtype)]
            island[0] += 1
            island[1] += event.cpu_time_total / 1000.0
    ops = _op_times(totals, runs)
    grand = sum(ms for _, ms in totals.values())
    result = {"status": "ok", "runtime": runtime, "source": "torch.profiler (self CPU time per op)", "runs": runs,
              "total_ms": grand / runs, "quantized": quantized, "ops": ops, "not_delegated": None,
              "float_islands": _op_times(islands, runs, grand) if quantized else None, "notes": []}
    if quantized:
        result["notes"].append("float islands: top-level ops on float inputs, inclusive CPU time (share of the "
                               "profiled total)")
        if not any(o["dtype"] == "int8" for o in ops):
            result["notes"].append("no int8 kernel ran: this runtime simulates the quantization (quantize / "
                                   "dequantize around float ops, as eager runs a PT2E graph)")
    return result


# ---- ExecuTorch: ETDump --------------------------------------------------------------------------------------------

_XNN_TAGS = re.compile(r"\(([^)]*)\)")
_XNN_FLOAT = {"F32", "F16", "BF16", "X32", "X16"}


def xnnpack_op_dtype(name: str, fallback: str | None = None) -> str | None:
    """int8 / float / None of an XNNPACK operator from its name's type tag (``Convolution (NHWC, QC8) IGEMM``);
    ``Convert`` is a float<->int8 conversion (None); ``fallback`` where the name has no type tag."""
    if name.startswith("Convert"):
        return None
    match = _XNN_TAGS.search(name)
    tags = [t.strip() for t in match.group(1).split(",")] if match else []
    if any(t.startswith("Q") or t == "X8" for t in tags):
        return "int8"
    if any(t in _XNN_FLOAT for t in tags):
        return "float"
    return fallback


def _xnnpack_op_name(name: str) -> str:
    """``Convolution (NHWC, F32) IGEMM #3`` -> ``Convolution (NHWC, F32) IGEMM`` (instances are numbered)."""
    return re.sub(r"\s+#\d+$", "", name)


def _portable_op(name: str) -> tuple[str, str | None]:
    op = name[len("native_call_"):] if name.startswith("native_call_") else name
    return op, (None if "quantize" in op or "choose_qparams" in op else "float")


def profile_executorch(path: str | Path, x: torch.Tensor, runs: int = PROFILE_RUNS, quantized: bool = False,
                       delegate_dtype: str | None = None) -> dict:
    """Profile the ``.pte`` at ``path`` on ``x`` with ETDump over ``runs`` calls after one warm-up call (a separate
    program load with the event tracer on; the timed program never has it). See the module docstring."""
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    with tempfile.TemporaryDirectory(prefix="etdump_") as tmp:
        program = Runtime.get().load_program(Path(path), enable_etdump=True)
        method = program.load_method("forward")
        inputs = [x.detach().cpu().contiguous()]
        for _ in range(runs + 1):
            method.execute(inputs)
        etdump = str(Path(tmp) / "profile.etdp")
        program.write_etdump_result_to_file(etdump, str(Path(tmp) / "debug.bin"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Output Buffer not found": no intermediate outputs were asked for
            inspector = Inspector(etdump_path=etdump)
    return etdump_profile(inspector.event_blocks, quantized, delegate_dtype)


def etdump_profile(event_blocks, quantized: bool = False, delegate_dtype: str | None = None,
                   skip_first: bool = True) -> dict:
    """The profile of ETDump event blocks (``Inspector.event_blocks``: blocks of events with ``name``,
    ``is_delegated_op`` and ``perf_data.raw``, one time in ms per run), leaving out the first run
    (``skip_first``: the warm-up). See the module docstring for how events become ops."""
    totals: dict = defaultdict(lambda: [0, 0.0])
    executes: list[float] = []
    skip = 1 if skip_first else 0
    for block in event_blocks:
        if not any(event.name == "Method::execute" for event in block.events):
            continue  # Method::init / Program::load_method
        pending: list[float] = []  # summed delegate-internal op time since the last DELEGATE_CALL
        for event in block.events:
            raw = list(event.perf_data.raw) if event.perf_data is not None else []
            samples = raw[skip:]
            calls, ms = len(samples), float(sum(samples))
            name = event.name or ""
            if event.is_delegated_op:
                key = (_xnnpack_op_name(name), True, xnnpack_op_dtype(name, delegate_dtype))
                pending.append(ms)
            elif name == "DELEGATE_CALL":
                inside = sum(pending)
                key = (DELEGATE_OVERHEAD, True, None) if pending else (DELEGATE_BLOCK, True, delegate_dtype)
                ms = max(ms - inside, 0.0) if pending else ms
                pending = []
            elif name == "Method::execute":
                executes.extend(samples)
                continue
            elif name in _ET_FRAMEWORK_EVENTS or not name:
                continue
            else:
                op, dtype = _portable_op(name)
                key = (op, False, dtype)
            if calls:
                totals[key][0] += calls
                totals[key][1] += ms
        skip = 0  # the warm-up is only in the first block
    count = len(executes)
    if not count:
        raise RuntimeError("the ETDump has no Method::execute events (this executorch build records no events)")
    ops = _op_times(totals, count)
    notes = []
    if any(o["op"] == DELEGATE_BLOCK for o in ops):
        notes.append("the XNNPACK delegate reported no per-op times: each delegate call is timed as a block; its "
                     "op composition is the export's 'ops' (from the lowered graph)")
    if quantized and delegate_dtype is None and any(o["delegated"] and o["dtype"] is None and
                                                    not o["op"].startswith("Convert") and
                                                    o["op"] != DELEGATE_OVERHEAD for o in ops):
        notes.append("XNNPACK ops without a type tag have dtype None: the lowered graph mixes int8 and float ops")
    return {"status": "ok", "runtime": "executorch", "source": "ETDump (XNNPACK per-op timing)", "runs": count,
            "total_ms": sum(executes) / count, "quantized": quantized, "ops": ops,
            "not_delegated": [o for o in ops if o["delegated"] is False],
            "float_islands": float_islands_of(ops) if quantized else None, "notes": notes}


def profile_runtime(runtime: str, program, path: str, x: torch.Tensor, quantized: bool = False,
                    delegate_dtype: str | None = None, threads: int | None = None) -> dict:
    """The operator profile of a loaded ``program`` on ``runtime`` (eager module, lite module; ExecuTorch and ONNX
    Runtime load the file at ``path`` again with their profilers on); errors are returned as
    ``{"status": "error", ...}``."""
    from lightning_segcompress.benchmark.runtimes import get_runtime

    try:
        return get_runtime(runtime).profile(program, path, x, quantized=quantized, delegate_dtype=delegate_dtype,
                                            threads=threads)
    except Exception as err:  # noqa: BLE001 - a profile must never lose the timing
        return profile_error(err)


def profile_error(err: BaseException) -> dict:
    text = str(err).strip()
    return {"status": "error", "error": {"type": type(err).__name__,
                                         "message": text.splitlines()[0][:500] if text else ""}}
