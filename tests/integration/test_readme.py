import re

import pytest
import torch

from support.common import REPO

README = REPO / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    """The examples run in order in one namespace, as a reader would paste them."""
    basics, pruning, memory, protocol = python_blocks()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # the examples do not seed: make them independent of the tests this worker ran before
    namespace = {"__name__": "readme_example"}
    exec(compile(basics, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "ModelStats(params=" in out and "['segmentation_head.0']" in out
    assert list((tmp_path / "runs" / "readme").glob("*.ckpt")), "the example's checkpoint was written"

    exec(compile(pruning, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    records = namespace["pruning"].records
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["achieved_fraction"] == pytest.approx(0.5, rel=0.03)
    restored_params = namespace["model_stats"](namespace["find_network"](namespace["restored"]), namespace["x"]).params
    assert restored_params < namespace["model_stats"](namespace["net"], namespace["x"]).params
    assert f"ModelStats(params={restored_params}" in out

    exec(compile(memory, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "| int8 |" in out and "4x4 tiles; prefix:" in out and "tail:" in out

    exec(compile(protocol, str(README), "exec"), namespace)
    protect = namespace["ProtectLayers"](["0"])
    assert protect.state_key == "ProtectLayers" and protect.hyperparameters() == {"layers": ["0"]}


@pytest.mark.parametrize("index, expected", [(0, ["lraspp_mobilenet_v3_large", "CityscapesDataModule"]),
                                             (1, ["DeviceBenchmark", "torchscript_lite", "tile_grids"]),
                                             (2, ["StructuredPruning", "conv_stem"]),
                                             (3, ["StructuredPruning", "lr_rewind_epoch: 0", "max_miou_drop: 1.0"]),
                                             (4, ["KnowledgeDistillation", "pixel_kl", "best.ckpt"]),
                                             (5, ["QuantizationAwareTraining", "freeze_bn_epoch: 10"]),
                                             (8, ["DeviceBenchmark", "save_artifact: true"])])
def test_readme_yaml_examples_parse_with_the_cli(index, expected, tmp_path, capsys):
    from lightning_segcompress.cli import main

    recipe = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)[index]
    path = tmp_path / "my_recipe.yaml"
    path.write_text(recipe)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert all(text in out for text in expected)
