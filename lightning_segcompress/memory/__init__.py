"""Memory-efficient inference (after Liu & Olsson 2019): an activation memory planner and exact tiled execution
of a network's high-resolution prefix. Pure torch."""

from lightning_segcompress.memory.buffers import Buffer, activation_buffers, live_bytes
from lightning_segcompress.memory.measure import measured_peak_bytes
from lightning_segcompress.memory.planner import ArenaPlan, overlapping_pairs, plan_greedy_by_size
from lightning_segcompress.memory.regions import TilingError, why_not_tileable
from lightning_segcompress.memory.report import (
    ArenaSummary,
    MemoryReport,
    format_memory_report,
    memory_report,
    write_tensor_table,
)
from lightning_segcompress.memory.tiling import Segment, TiledInference, TilingPlan, find_prefix, find_tail, plan_tiles
from lightning_segcompress.memory.trace import TracingError, export_graph

__all__ = [
    "ArenaPlan", "ArenaSummary", "Buffer", "MemoryReport", "Segment", "TiledInference", "TilingError", "TilingPlan",
    "TracingError", "activation_buffers", "export_graph", "find_prefix", "find_tail", "format_memory_report",
    "live_bytes", "measured_peak_bytes", "memory_report", "overlapping_pairs", "plan_greedy_by_size", "plan_tiles",
    "why_not_tileable", "write_tensor_table",
]
