"""The code in README.md and docs/*.md works where it is written: the Python examples run in one namespace, the YAML
examples are configs the CLI accepts. The README keeps the set-up and the walk-through (run by
tests/integration/test_cli.py); the examples live on the docs pages, so the checks follow them there."""

import re
from pathlib import Path

import pytest
import torch

from support.common import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"

# every ```python block of README.md and docs/*.md, in the order a reader runs them: each builds on the ones before
# (MySegmenter, data, x, model_stats, ... come from the first)
PYTHON_EXAMPLES = [("docs/usage.md", 0), ("docs/pruning.md", 0), ("docs/tiling_and_memory.md", 0),
                   ("docs/protocol.md", 0)]
# every ```yaml block of README.md and docs/*.md, with what `segcompress fit --print_config` must print for it
YAML_EXAMPLES = [("docs/usage.md", 0, ["lraspp_mobilenet_v3_large", "CityscapesDataModule"]),
                 ("docs/benchmark_and_export.md", 0, ["DeviceBenchmark", "torchscript_lite", "tile_grids"]),
                 ("docs/pruning.md", 0, ["StructuredPruning", "conv_stem"]),
                 ("docs/pruning.md", 1, ["StructuredPruning", "lr_rewind_epoch: 0", "max_miou_drop: 1.0"]),
                 ("docs/distillation.md", 0, ["KnowledgeDistillation", "pixel_kl", "best.ckpt"]),
                 ("docs/quantization.md", 0, ["QuantizationAwareTraining", "freeze_bn_epoch: 10"]),
                 ("docs/shunt.md", 0, ["ShuntReplacement", "stage_a_epochs: 3", "KnowledgeDistillation"]),
                 ("docs/sparsity.md", 0, ["SparsityRegularization", "method: acsl", "PostPruning"]),
                 ("docs/post_pruning.md", 0, ["StructuredPruning", "PostPruning", "max_group_miou_drop: 0.5"]),
                 ("docs/benchmark_and_export.md", 1, ["DeviceBenchmark", "save_artifact: true"])]


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def fenced_blocks(language: str) -> dict[str, list[str]]:
    """``{page relative to the repo: [block, ...]}`` of the ``` ```language ``` blocks of every page that has any."""
    found = {}
    for page in pages():
        blocks = re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)
        if blocks:
            found[page.relative_to(REPO).as_posix()] = blocks
    return found


def block(language: str, page: str, index: int) -> str:
    blocks = fenced_blocks(language).get(page, [])
    assert index < len(blocks), f"{page} has {len(blocks)} ```{language} blocks; the test expects block {index}"
    return blocks[index]


@pytest.mark.parametrize("language, expected", [("python", PYTHON_EXAMPLES),
                                                ("yaml", [(page, i) for page, i, _ in YAML_EXAMPLES])])
def test_every_example_block_is_tested(language, expected):
    """Each ```python / ```yaml block of README.md and docs/*.md is one the tests below run: 4 Python blocks (all
    in docs/, none in the README) and 10 YAML blocks. A block added, moved or removed changes these lists."""
    found = sorted((page, i) for page, blocks in fenced_blocks(language).items() for i in range(len(blocks)))
    assert found == sorted(expected), f"```{language} blocks found: {found}; the tests expect: {sorted(expected)}"


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    """The examples run in order in one namespace, as a reader would paste them."""
    (basics_page, basics), (pruning_page, pruning), (memory_page, memory), (protocol_page, protocol) = [
        (REPO / page, block("python", page, index)) for page, index in PYTHON_EXAMPLES]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # the examples do not seed: make them independent of the tests this worker ran before
    namespace = {"__name__": "readme_example"}
    exec(compile(basics, str(basics_page), "exec"), namespace)
    out = capsys.readouterr().out
    assert "ModelStats(params=" in out and "['segmentation_head.0']" in out
    assert list((tmp_path / "runs" / "readme").glob("*.ckpt")), "the example's checkpoint was written"

    exec(compile(pruning, str(pruning_page), "exec"), namespace)
    out = capsys.readouterr().out
    records = namespace["pruning"].records
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["achieved_fraction"] == pytest.approx(0.5, rel=0.03)
    restored_params = namespace["model_stats"](namespace["find_network"](namespace["restored"]), namespace["x"]).params
    assert restored_params < namespace["model_stats"](namespace["net"], namespace["x"]).params
    assert f"ModelStats(params={restored_params}" in out

    exec(compile(memory, str(memory_page), "exec"), namespace)
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "| int8 |" in out and "4x4 tiles; prefix:" in out and "tail:" in out

    exec(compile(protocol, str(protocol_page), "exec"), namespace)
    protect = namespace["ProtectLayers"](["0"])
    assert protect.state_key == "ProtectLayers" and protect.hyperparameters() == {"layers": ["0"]}


@pytest.mark.parametrize("page, index, expected", YAML_EXAMPLES, ids=[f"{p}-{i}" for p, i, _ in YAML_EXAMPLES])
def test_readme_yaml_examples_parse_with_the_cli(page, index, expected, tmp_path, capsys):
    from lightning_segcompress.cli import main

    path = tmp_path / "my_recipe.yaml"
    path.write_text(block("yaml", page, index))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert all(text in out for text in expected), f"{page} yaml block {index}: missing {expected}"
