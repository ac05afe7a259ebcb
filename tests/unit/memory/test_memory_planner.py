import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_segcompress.cli.memory import main as memory_main
from lightning_segcompress.memory import (
    Buffer,
    TracingError,
    activation_buffers,
    export_graph,
    live_bytes,
    measured_peak_bytes,
    memory_report,
    overlapping_pairs,
    plan_greedy_by_size,
)
from lightning_segcompress.models import build_network
from support.common import SMP_DEEPLAB


def test_hand_made_lifetimes_reach_the_known_optimal_arena():
    buffers = [Buffer("A", 100, 0, 2), Buffer("B", 90, 4, 6), Buffer("C", 50, 0, 6), Buffer("D", 40, 3, 3)]
    plan = plan_greedy_by_size(buffers, alignment=1)
    # A and B never live together and share offset 0; C sits above both; D reuses the hole A left below C.
    assert plan.offsets == {"A": 0, "B": 0, "C": 100, "D": 0}
    assert plan.arena_size == 150 == max(live_bytes(buffers, 7))  # optimal: equals the lower bound
    assert overlapping_pairs(buffers, plan) == []


def test_best_fit_takes_the_smallest_gap_that_holds_the_buffer():
    long_lived = [Buffer("Q1", 100, 0, 9), Buffer("Q3", 50, 0, 9), Buffer("Q5", 30, 0, 9)]
    short_lived = [Buffer("Q2", 60, 0, 1), Buffer("Q4", 40, 0, 1)]
    # placed last (smallest); gaps at step 5: 60 bytes at 100 (where Q2 was), 40 bytes at 210 (where Q4 was)
    late = Buffer("Q6", 25, 5, 5)
    plan = plan_greedy_by_size(long_lived + short_lived + [late], alignment=1)
    assert [plan.offsets[n] for n in ("Q1", "Q2", "Q3", "Q4", "Q5")] == [0, 100, 160, 210, 250]
    assert plan.offsets["Q6"] == 210  # first fit would have chosen 100
    assert plan.arena_size == 280


def test_alignment_rounds_offsets_up():
    buffers = [Buffer("a", 100, 0, 1), Buffer("b", 10, 0, 1)]
    assert plan_greedy_by_size(buffers, alignment=64).offsets["b"] == 128
    with pytest.raises(ValueError, match="alignment"):
        plan_greedy_by_size(buffers, alignment=0)


def test_overlap_check_finds_a_clash():
    buffers = [Buffer("a", 10, 0, 1), Buffer("b", 10, 1, 2)]
    plan = plan_greedy_by_size(buffers, alignment=1)
    clashing = type(plan)(offsets={"a": 0, "b": 5}, arena_size=15)
    assert overlapping_pairs(buffers, plan) == [] and overlapping_pairs(buffers, clashing) == [("a", "b")]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = F.relu_(self.conv1(x))  # in place: no new buffer
        return self.conv3(self.conv2(a)).flatten(2)  # a view: no new buffer


def test_graph_buffers_skip_views_and_in_place_ops_and_follow_lifetimes():
    graph = export_graph(Chain(), torch.zeros(1, 3, 8, 8)).graph
    buffers, steps = activation_buffers(graph)
    sizes = {b.name: (b.size, b.first, b.last) for b in buffers}
    assert len(steps) == 6  # input, conv1, relu_, conv2, conv3, flatten
    assert sorted(sizes.values()) == [(512, 4, 5), (768, 0, 1), (1024, 1, 3), (1024, 3, 4)]
    assert sum(b.size for b in buffers) == 3328 and max(live_bytes(buffers, len(steps))) == 2048
    assert plan_greedy_by_size(buffers, alignment=1).arena_size == 2048
    int8, _ = activation_buffers(graph, int8=True)
    assert sum(b.size for b in int8) == 3328 // 4


def test_report_on_an_smp_model_is_a_valid_plan_between_the_bounds():
    net = build_network(SMP_DEEPLAB, num_classes=3)
    x = torch.randn(1, 3, 64, 96)
    report = memory_report(net, x)
    for summary in (report.fp32, report.int8):
        assert summary.lower_bound <= summary.planned <= summary.naive
        assert summary.planned < summary.naive / 2
    assert report.int8.naive * 4 == report.fp32.naive
    assert report.fp32.live_at_peak and report.fp32.largest[0]["bytes"] >= report.fp32.largest[-1]["bytes"]
    assert report.fp32.peak_module  # names the module where the peak occurs
    graph = export_graph(net, x).graph
    buffers, _ = activation_buffers(graph)
    assert overlapping_pairs(buffers, plan_greedy_by_size(buffers)) == []
    assert report.measured_peak >= report.fp32.lower_bound  # eager frees no earlier than the graph's last use
    assert net.training, "the user's network keeps its train/eval mode"


def test_measured_peak_counts_the_intermediate_tensors():
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 1, 1)).eval()
    x = torch.zeros(1, 3, 32, 32)
    # input 12 KB, conv1 output 64 KB, then conv2 output 4 KB while conv1's is alive
    assert measured_peak_bytes(net, x) == (3 + 16 + 1) * 32 * 32 * 4


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if y.sum() > 0 else y


def test_untraceable_model_gets_one_clear_error():
    with pytest.raises(TracingError, match="Cannot trace DataDependent with torch.export"):
        memory_report(DataDependent(), torch.randn(1, 3, 8, 8))


def test_memory_cli_prints_untiled_and_tiled_reports(tmp_path, capsys):
    out_file, csv_file = tmp_path / "memory.md", tmp_path / "tensors.csv"
    memory_main([f"--network={SMP_DEEPLAB}".replace("'", '"'), "--num_classes=3", "--input_size=[64,64]",
                 "--grids=[[2,2]]", f"--output={out_file}", f"--tensors_csv={csv_file}"])
    rows = list(csv.DictReader(csv_file.open()))
    assert rows[0]["shape"] == "1x3x64x64" and rows[0]["first_step"] == "0"  # the input, first in execution order
    assert [int(r["first_step"]) for r in rows] == sorted(int(r["first_step"]) for r in rows)
    assert all(int(r["int8_bytes"]) * 4 == int(r["bytes"]) for r in rows)
    printed = capsys.readouterr().out
    assert "# Activation memory, untiled" in printed and "# Activation memory, tiled 2x2" in printed
    assert "| fp32 |" in printed and "| int8 |" in printed and "Largest difference to untiled output" in printed
    assert out_file.read_text().strip() == printed.strip()


def test_memory_cli_reads_a_recipe_and_needs_one_source(capsys):
    memory_main(["--recipe=recipes/quickstart.yaml", "--input_size=[64,64]", "--measure=false"])
    printed = capsys.readouterr().out
    assert "Input 1x3x64x64" in printed and "not measured" in printed and "network.decoder" in printed
    with pytest.raises(ValueError, match="Give what to load"):
        memory_main(["--input_size=[64,64]"])
