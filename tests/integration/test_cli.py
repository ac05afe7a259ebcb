import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_segcompress.cli import main
from lightning_segcompress.models import SegmentationModule
from support import user_module
from support.common import REPO, smoke_override

TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "limit_predict_batches": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
    },
    "model": {
        "init_args": {
            "network": {
                "class_path": "segmentation_models_pytorch.Unet",
                "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
            },
            "num_classes": 4,
        }
    },
    "data": {"init_args": {"num_classes": 4, "image_size": [64, 64], "num_train": 8, "num_val": 4,
                           "num_test": 4, "batch_size": 4}},
}


@pytest.fixture
def config_file(tmp_path):
    run_dir = tmp_path / "run"  # Lightning saves the resolved config.yaml there; keep ours apart
    config = dict(TINY_CONFIG, trainer=dict(TINY_CONFIG["trainer"], default_root_dir=str(run_dir)))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_with_config_file_then_validate_and_predict_from_checkpoint(config_file, tmp_path, capsys):
    main(["fit", "--config", str(config_file), "--trainer.callbacks+=ModelCheckpoint",
          f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"])
    out = capsys.readouterr().out
    assert "segcompress fit finished" in out and "val_miou = " in out
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")

    module = SegmentationModule.load_from_checkpoint(ckpt, weights_only=True)
    assert module.hparams.num_classes == 4
    assert module.hparams.network["class_path"] == "segmentation_models_pytorch.Unet"

    main(["validate", "--config", str(config_file), f"--ckpt_path={ckpt}"])
    main(["test", "--config", str(config_file), f"--ckpt_path={ckpt}"])
    main(["predict", "--config", str(config_file), f"--ckpt_path={ckpt}"])


def test_defaults_are_segmentation_module_and_synthetic_data(tmp_path):
    from lightning_segcompress.cli import SegCompressCLI

    cli = SegCompressCLI(args=["--data.init_args.num_classes=3", "--model.init_args.num_classes=3",
                               "--data.init_args.num_train=8", "--data.init_args.batch_size=4"], run=False)
    assert type(cli.model).__name__ == "SegmentationModule"
    assert type(cli.datamodule).__name__ == "SyntheticScenesDataModule"
    assert cli.model.hparams.network["class_path"] == "segmentation_models_pytorch.DeepLabV3Plus"
    assert cli.model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_bad_config_value_names_the_option(config_file, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config_file), "--model.init_args.optimizer=rmsprop"])
    err = capsys.readouterr().err
    assert "optimizer" in err and "rmsprop" in err


def test_console_script_runs_quickstart_recipe_config(monkeypatch, capsys):
    """The installed `segcompress` entry point parses the shipped quickstart recipe: the script starts (``--help``
    imports no torch, about a second), and the function it names, called the way the script calls it (no
    arguments, ``sys.argv``), prints the recipe's config in this process instead of a second one that imports
    torch and Lightning again."""
    from importlib.metadata import entry_points

    exe = Path(sys.executable).with_name("segcompress")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "  fit " in result.stdout, result.stderr[-2000:]
    (script,) = entry_points(group="console_scripts", name="segcompress")
    monkeypatch.setattr(sys, "argv", [str(exe), "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
                                      "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        script.load()()
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_segcompress.SegmentationModule"
    assert printed["model"]["init_args"]["num_classes"] == printed["data"]["init_args"]["num_classes"]


def _imports_torch(code: str) -> tuple[str, bool]:
    """stdout of ``code`` in a fresh interpreter, and whether it imported torch."""
    script = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, "TORCH True" in result.stdout


@pytest.mark.parametrize("command", [[], ["--help"], ["benchmark", "--help"], ["memory", "--help"],
                                     ["shunt", "--help"], ["export", "--help"]], ids=" ".join)
def test_help_of_segcompress_and_every_tool_imports_no_torch(command):
    out, torch_imported = _imports_torch(f"from lightning_segcompress.cli import main; main({command!r})")
    assert not torch_imported
    if len(command) < 2:
        for name in ("fit", "validate", "test", "predict", "benchmark", "memory", "shunt", "export"):
            assert f"  {name} " in out
    else:
        assert f"usage: segcompress {command[0]}" in out and "--ckpt" in out and "--input_size" in out


def test_tools_share_one_vocabulary():
    import importlib
    import inspect

    from lightning_segcompress.cli import TOOLS

    shared = {"ckpt", "network", "recipe", "model_class", "network_attribute", "num_classes", "input_size"}
    defaults = {}
    for name, (module, function, _) in TOOLS.items():
        parameters = inspect.signature(getattr(importlib.import_module(module), function)).parameters
        assert shared <= set(parameters), (name, shared - set(parameters))
        defaults[name] = parameters["num_classes"].default
    assert len(set(defaults.values())) == 1, defaults


def test_tool_arguments_input_size_as_words_and_old_names():
    from lightning_segcompress.cli.tools import normalize_args

    assert normalize_args(["--input_size", "64", "96", "--runs=2"]) == ["--input_size=[64,96]", "--runs=2"]
    with pytest.warns(FutureWarning, match="--checkpoint is renamed --ckpt"):
        assert normalize_args(["--checkpoint=a.ckpt"]) == ["--ckpt=a.ckpt"]


def test_old_script_names_are_aliases(tmp_path, capsys):
    from lightning_segcompress.cli.memory import main as memory_alias

    memory_alias(["--recipe=recipes/quickstart.yaml", "--input_size", "32", "32", "--measure=false"])
    alias_out = capsys.readouterr().out
    main(["memory", "--recipe=recipes/quickstart.yaml", "--input_size", "32", "32", "--measure=false"])
    assert capsys.readouterr().out == alias_out and "Input 1x3x32x32" in alias_out


USER_MODULE = "support.user_module.UserSegmenter"
USER_DATA = "support.user_module.ColourScenesData"


def _trained_user_checkpoint(module_file, tmp_path) -> tuple[Path, dict]:
    import pytorch_lightning as pl

    torch.manual_seed(0)
    module = module_file.UserSegmenter(lr=0.2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, *module_file.loaders())
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, {k: v.clone() for k, v in module.state_dict().items()}


def test_model_init_args_weights_starts_any_user_module_from_a_trained_checkpoint(tmp_path):
    from lightning_segcompress.cli import SegCompressCLI

    ckpt, trained = _trained_user_checkpoint(user_module, tmp_path)
    cli = SegCompressCLI(args=[f"--model={USER_MODULE}", f"--data={USER_DATA}", "--model.init_args.lr=0.01",
                               f"--model.init_args.weights={ckpt}"], run=False)
    assert type(cli.model).__name__ == "UserSegmenter" and cli.model.lr == 0.01
    loaded = cli.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())

    # a bare state dict of the network, with the network named explicitly
    torch.save(cli.model.segmenter_net.state_dict(), tmp_path / "net.pt")
    cli = SegCompressCLI(args=[f"--model={USER_MODULE}", f"--data={USER_DATA}", f"--weights={tmp_path / 'net.pt'}",
                               "--network_attribute=segmenter_net"], run=False)
    assert all(torch.equal(cli.model.state_dict()[k], v) for k, v in trained.items())


def test_model_weights_of_another_architecture_is_one_clear_error(tmp_path):
    from lightning_segcompress.cli import SegCompressCLI
    from lightning_segcompress.utils.checkpoint_io import CheckpointError

    module = SegmentationModule(network=TINY_CONFIG["model"]["init_args"]["network"], num_classes=4)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="other.ckpt"):
        SegCompressCLI(args=[f"--model={USER_MODULE}", f"--data={USER_DATA}",
                             f"--model.init_args.weights={tmp_path / 'other.ckpt'}"], run=False)


def _smoke(recipe: str) -> list[str]:
    return smoke_override(REPO / "recipes" / recipe)


@pytest.mark.slow
def test_readme_walkthrough_train_compress_export_segment_an_image(tmp_path, capsys, quickstart_run):
    """README "Compress my trained model": quickstart -> compress_trained with its checkpoint -> export -> the
    exported file segments an image file into a colour PNG. The quickstart run (its smoke override) is the one
    test_recipes.py checks, made once per test run (the quickstart_run fixture, tests/conftest.py)."""
    pytest.importorskip("executorch")
    from PIL import Image

    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    (trained,) = quickstart_run.glob("*/version_0/checkpoints/best-*.ckpt")

    main(["fit", "--config", "recipes/compress_trained.yaml", *_smoke("compress_trained.yaml"),
          f"--model.init_args.weights={trained}", f"--trainer.default_root_dir={tmp_path / 'compressed'}", *quiet])
    (compressed,) = (tmp_path / "compressed").glob("*/version_0/checkpoints/last.ckpt")
    kinds = [stage["kind"] for stage in torch.load(compressed, weights_only=True)["segcompress"]["stages"]]
    assert kinds == ["structured_pruning", "quantization"]

    model_file = tmp_path / "model.pte"
    main(["export", "--ckpt", str(compressed), "--runtime", "executorch", "--input_size", "64", "64",
          "--output", str(model_file), "--runs=1", "--warmup=0",
          "--int8_agreement=0.5"])  # trained on 2 images: nearly tied logits, int8 rounding flips some pixels
    bundle = json.loads(model_file.with_suffix(".json").read_text())
    assert bundle["int8"] and bundle["input_size"] == [64, 64]
    assert [stage["kind"] for stage in bundle["compression_stages"]] == kinds

    image = tmp_path / "street.png"
    Image.fromarray((np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)).save(image)
    result = subprocess.run([sys.executable, str(REPO / "examples" / "segment_image.py"), str(model_file),
                             str(image), "--output", str(tmp_path / "mask.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    mask = Image.open(tmp_path / "mask.png")
    assert mask.size == (80, 48) and mask.mode in ("RGB", "P")
