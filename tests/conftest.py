import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist every worker gets one core; otherwise the two cores of CI. Processes a test starts inherit
# the worker's thread count, so tests comparing their outputs bit for bit see the same float reductions.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

SMP_DEEPLAB = {
    "class_path": "segmentation_models_pytorch.DeepLabV3Plus",
    "init_args": {"encoder_name": "tu-mobilenetv3_small_100"},
}
SMP_UNET = {
    "class_path": "segmentation_models_pytorch.Unet",
    "init_args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
}
TV_LRASPP = {"class_path": "torchvision.models.segmentation.lraspp_mobilenet_v3_large"}


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


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def run_ddp_script(name: str, tmp_path, timeout: int = 240) -> list[dict]:
    """Run ``tests/scripts/<name>`` (a 2-process CPU DDP fit that writes ``rank{r}.json`` into its argument
    folder) in a fresh process and return what both ranks wrote."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "scripts" / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
