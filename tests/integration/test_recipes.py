"""Every recipe in recipes/ runs end to end with the smoke override written in its own header."""


import pytest

from support.common import REPO, smoke_override
from support.shared import fit_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
COMPRESSION_REPORT = "*/version_0/benchmark/compression_report.md"
# what each recipe must leave in its run folder: (glob pattern, text the file contains)
EXPECTED = {
    "quickstart": [("*/version_0/checkpoints/best-*.ckpt", None)],
    "compress_trained": [("*/version_0/checkpoints/last.ckpt", None)],
    "structured_pruning": [("*/version_0/pruning/pruning_steps.json", '"macs"')],
    "full_pipeline": [(COMPRESSION_REPORT, "| after_structured_pruning | structured_pruning |"),
                      (COMPRESSION_REPORT, "| final | structured_pruning + quantization |"),
                      ("*/version_0/benchmark/miou_vs_latency.png", None),
                      ("*/version_0/benchmark/samples.png", None),
                      ("*/version_0/checkpoints/last.ckpt", None)],
    "shunt_kd": [("*/version_0/shunt/shunt_report.md", "Replaced blocks"),
                 (COMPRESSION_REPORT, "| final | shunt |")],
    "embedded_memory": [("*/version_0/benchmark/benchmark.md", "## Activation memory"),
                        ("*/version_0/benchmark/benchmark.md", "| after_structured_pruning_tiled_2x2 |"),
                        (COMPRESSION_REPORT, "| final | structured_pruning + quantization |")],
    "budgeted_sparsity_kd": [(COMPRESSION_REPORT, "| final | structured_pruning |")],
    "pixel_level_cap": [(COMPRESSION_REPORT, "| final | structured_pruning |")],
    "post_pruning_encoder_decoder": [("*/version_0/post_pruning/post_pruning.md", "max_group_miou_drop: 0.5"),
                                     (COMPRESSION_REPORT, "| final | structured_pruning |")],
}


def test_every_recipe_has_a_header_and_an_expectation():
    assert {r.stem for r in RECIPES} == set(EXPECTED)
    for recipe in RECIPES:
        header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
        assert any("segcompress fit --config recipes/" in line for line in header), recipe.name
        assert any("cityscapes" in line.lower() for line in header), recipe.name
        smoke_override(recipe)


# compress_trained needs a trained checkpoint: test_cli.py's README walk-through runs it with its smoke override on the
# quickstart run (the quickstart_run fixture, tests/conftest.py)
RUN_HERE = [r for r in RECIPES if r.stem != "compress_trained"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RUN_HERE, ids=lambda r: r.stem)
def test_recipe_runs_its_smoke_override(recipe, tmp_path, request):
    if recipe.stem == "quickstart":  # the run the README walk-through (test_cli.py) compresses: made once per run
        folder = request.getfixturevalue("quickstart_run")
        out = (folder / "stdout.txt").read_text()
    else:
        folder, out = tmp_path, fit_recipe(tmp_path, recipe.stem)
    assert "segcompress fit finished" in out
    for pattern, text in EXPECTED[recipe.stem]:
        found = sorted(folder.glob(pattern))
        assert found, f"{recipe.stem}: nothing matches {pattern}"
        if text is not None:
            assert text in found[0].read_text(), f"{recipe.stem}: {found[0]} lacks {text!r}"
