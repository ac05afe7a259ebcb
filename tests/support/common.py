"""Network specs, Trainer settings and the DDP script runner that the tests share."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SCRIPTS = TESTS / "scripts"

SMP_DEEPLAB = {
    "class_path": "segmentation_models_pytorch.DeepLabV3Plus",
    "init_args": {"encoder_name": "tu-mobilenetv3_small_100"},
}
SMP_UNET = {
    "class_path": "segmentation_models_pytorch.Unet",
    "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
}
TV_LRASPP = {"class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"}
SMOKE_PREFIX = "# CI smoke override:"


def smoke_override(recipe: Path) -> list[str]:
    """The CLI arguments a recipe's ``# CI smoke override:`` header line gives (exactly one such line)."""
    lines = [line for line in recipe.read_text().splitlines() if line.startswith(SMOKE_PREFIX)]
    assert len(lines) == 1, f"{recipe.name} needs exactly one '{SMOKE_PREFIX} ...' header line"
    return shlex.split(lines[0][len(SMOKE_PREFIX):])


def trainer_kwargs(tmp_path, **overrides):
    kwargs = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        limit_predict_batches=1,
    )
    kwargs.update(overrides)
    return kwargs


def subprocess_env(**extra) -> dict:
    """The environment for a Python subprocess that imports ``support`` (``tests/`` on its path), offline, on
    the CPU, with the calling worker's thread count."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path, **extra)


def run_ddp_script(name: str, tmp_path, timeout: int = 240) -> list[dict]:
    """Run ``tests/scripts/<name>`` (a 2-process CPU DDP fit that writes ``rank{r}.json`` into its argument
    folder) in a fresh process and return what both ranks wrote."""
    env = subprocess_env(OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(SCRIPTS / name), str(tmp_path)], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
