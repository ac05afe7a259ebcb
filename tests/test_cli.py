import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_segcompress.cli import main
from lightning_segcompress.models import SegmentationModule

REPO = Path(__file__).resolve().parents[1]

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


@pytest.mark.slow
def test_console_script_runs_quickstart_recipe_config(tmp_path):
    """The installed `segcompress` entry point parses the shipped quickstart recipe."""
    exe = Path(sys.executable).with_name("segcompress")
    result = subprocess.run(
        [str(exe), "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--print_config"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] == "lightning_segcompress.SegmentationModule"
    assert printed["model"]["init_args"]["num_classes"] == printed["data"]["init_args"]["num_classes"]
