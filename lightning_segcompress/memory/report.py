"""The memory report: naive sum of activations, planned arena, lower bound, the peak and the largest tensors,
next to what eager PyTorch measurably holds for the same input."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from lightning_segcompress.memory.buffers import Buffer, activation_buffers, live_bytes
from lightning_segcompress.memory.measure import measured_peak_bytes
from lightning_segcompress.memory.planner import ArenaPlan, overlapping_pairs, plan_greedy_by_size
from lightning_segcompress.memory.trace import export_graph, module_path


@dataclass
class ArenaSummary:
    """One precision's numbers (bytes)."""

    naive: int
    planned: int
    lower_bound: int
    peak_step: int
    peak_op: str
    peak_module: str
    live_at_peak: list[dict] = field(default_factory=list)
    largest: list[dict] = field(default_factory=list)


@dataclass
class MemoryReport:
    input_shape: list[int]
    buffers: int
    steps: int
    fp32: ArenaSummary
    int8: ArenaSummary
    measured_peak: int | None = None
    tensors: list[dict] = field(default_factory=list)  # every activation in execution order, with its fp32 offset

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(
    buffers: list[Buffer], steps: list[fx.Node], alignment: int = 64, top: int = 5
) -> tuple[ArenaSummary, ArenaPlan]:
    """Plan ``buffers`` and describe the result; raises if the plan let two live buffers overlap."""
    plan = plan_greedy_by_size(buffers, alignment)
    clashes = overlapping_pairs(buffers, plan)
    if clashes:  # a planner bug, never a property of the model
        raise AssertionError(f"memory plan overlaps live buffers: {clashes[:3]}")
    live = live_bytes(buffers, len(steps))
    peak_step = max(range(len(live)), key=live.__getitem__) if live else 0
    at_peak = sorted((b for b in buffers if b.first <= peak_step <= b.last), key=lambda b: -b.size)
    node = steps[peak_step] if steps else None
    return ArenaSummary(
        naive=sum(b.size for b in buffers),
        planned=plan.arena_size,
        lower_bound=max(live, default=0),
        peak_step=peak_step,
        peak_op=f"{node.name} ({node.target})" if node is not None else "",
        peak_module=module_path(node) if node is not None else "",
        live_at_peak=[_describe(b) for b in at_peak[:top]],
        largest=[_describe(b) for b in sorted(buffers, key=lambda b: -b.size)[:top]],
    ), plan


def memory_report(network: nn.Module, example: torch.Tensor, alignment: int = 64, top: int = 5,
                  measure: bool = True) -> MemoryReport:
    """Trace ``network`` for ``example`` (see :func:`export_graph`), plan its activations for fp32 and int8,
    and (``measure``) run it eagerly to record the peak of live tensor bytes."""
    graph = export_graph(network, example).graph
    fp32_buffers, steps = activation_buffers(graph)
    int8_buffers, _ = activation_buffers(graph, int8=True)
    fp32, plan = summarize(fp32_buffers, steps, alignment, top)
    int8, _ = summarize(int8_buffers, steps, alignment, top)
    measured = measured_peak_bytes(network, example) if measure else None
    tensors = [{**_describe(b), "int8_bytes": b8.size, "first_step": b.first, "last_step": b.last,
                "offset": plan.offsets[b.name]} for b, b8 in zip(fp32_buffers, int8_buffers)]
    return MemoryReport(input_shape=list(example.shape), buffers=len(fp32_buffers), steps=len(steps),
                        fp32=fp32, int8=int8, measured_peak=measured, tensors=tensors)


def write_tensor_table(report: MemoryReport, path: str | Path) -> Path:
    """Every activation in execution order (size fp32/int8, lifetime, planned offset) as CSV."""
    path = Path(path)
    columns = ("tensor", "module", "shape", "bytes", "int8_bytes", "first_step", "last_step", "offset")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in report.tensors:
            writer.writerow({**row, "shape": "x".join(map(str, row["shape"]))})
    return path


def _describe(buffer: Buffer) -> dict:
    return {"tensor": buffer.name, "module": buffer.module, "shape": list(buffer.shape), "bytes": buffer.size}


def format_memory_report(report: MemoryReport, title: str = "Activation memory") -> str:
    """Markdown: the three planner numbers per precision, the measured peak, where the peak is, the largest
    tensors."""
    shape = "x".join(str(s) for s in report.input_shape)
    measured = _mb(report.measured_peak) if report.measured_peak is not None else "not measured"
    lines = [
        f"# {title}", "",
        f"Input {shape}: {report.buffers} activation buffers over {report.steps} steps. Naive = every activation "
        "in its own memory; planned = one arena, greedy by size with best-fit gaps (64-byte aligned); lower "
        "bound = most bytes alive at one step. Measured = peak of live tensors in eager PyTorch (fp32).", "",
        "| precision | naive MB | planned MB | lower bound MB | planned / naive | measured eager peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, summary in (("fp32", report.fp32), ("int8", report.int8)):
        ratio = summary.planned / summary.naive if summary.naive else 0.0
        lines.append(f"| {name} | {_mb(summary.naive)} | {_mb(summary.planned)} | {_mb(summary.lower_bound)} | "
                     f"{ratio:.3f} | {measured if name == 'fp32' else ''} |")
    peak = report.fp32
    lines += ["", f"Peak at step {peak.peak_step}: {peak.peak_op} in `{peak.peak_module or '<top>'}`; alive there:", ""]
    lines += _tensor_table(peak.live_at_peak)
    lines += ["", "Largest activations:", ""] + _tensor_table(peak.largest)
    return "\n".join(lines) + "\n"


def _tensor_table(rows: list[dict]) -> list[str]:
    lines = ["| tensor | module | shape | MB (fp32) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['tensor']} | `{row['module'] or '<top>'}` | {'x'.join(map(str, row['shape']))} | "
                     f"{_mb(row['bytes'])} |")
    return lines


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:.2f}"
