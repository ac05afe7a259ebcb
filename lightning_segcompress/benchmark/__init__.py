"""Export to on-device runtimes and measure latency, size, MACs and memory. Pure torch."""

from lightning_segcompress.benchmark.report import compare, markdown_table, memory_table, write_report
from lightning_segcompress.benchmark.runner import (
    RUNTIMES,
    BenchmarkSettings,
    LogitsOnly,
    benchmark_network,
    benchmark_tiled,
)

__all__ = ["RUNTIMES", "BenchmarkSettings", "LogitsOnly", "benchmark_network", "benchmark_tiled", "compare",
           "markdown_table", "memory_table", "write_report"]
