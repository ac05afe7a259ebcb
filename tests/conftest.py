import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

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
