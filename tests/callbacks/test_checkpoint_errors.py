"""Loading a checkpoint, weights or teacher file that is missing, truncated, not a checkpoint or from another
architecture: one clear error naming the file and the cause, never advice to disable weights_only."""

import pytest
import torch
from torch import nn

from lightning_segcompress import SegmentationModule, load_compressed
from lightning_segcompress.callbacks import KnowledgeDistillation
from lightning_segcompress.models import build_network
from lightning_segcompress.state import load_network_weights
from lightning_segcompress.utils.checkpoint_io import CheckpointError, read_checkpoint
from support.common import SMP_UNET


def _files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in build_network(SMP_UNET, num_classes=4).state_dict().items()}},
               good)
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save(nn.Conv2d(3, 4, 3), tmp_path / "pickled_module.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "folder.ckpt").mkdir()
    return good


@pytest.mark.parametrize("name, cause", [
    ("missing.ckpt", "does not exist"),
    ("folder.ckpt", "is a folder"),
    ("empty.ckpt", "is empty"),
    ("truncated.ckpt", "truncated or in another format"),
    ("notes.txt", "truncated or in another format|not a PyTorch checkpoint"),
    ("pickled_module.pt", "holds pickled Python objects"),
    ("tensor.pt", "holds a Tensor, not a checkpoint"),
])
def test_each_unusable_file_gives_one_error_naming_it_and_the_cause(tmp_path, name, cause):
    _files(tmp_path)
    path = tmp_path / name
    for load in (lambda: read_checkpoint(path),
                 lambda: load_compressed(build_network(SMP_UNET, num_classes=4), path),
                 lambda: load_network_weights(build_network(SMP_UNET, num_classes=4), path)):
        with pytest.raises(CheckpointError, match=cause) as info:
            load()
        message = str(info.value)
        assert str(path) in message and "weights_only" not in message


def test_weights_from_another_architecture_name_the_file_and_the_mismatch(tmp_path):
    good = _files(tmp_path)
    other = build_network(SMP_UNET, num_classes=7)  # another head: same keys, other shapes
    with pytest.raises(CheckpointError, match=r"do not fit this network: it was saved from another architecture"):
        load_compressed(SegmentationModule(SMP_UNET, num_classes=7), good)
    with pytest.raises(ValueError, match=str(good)):
        load_network_weights(other, good)
    with pytest.raises(ValueError, match="does not exist"):
        SegmentationModule(SMP_UNET, num_classes=4, weights=str(tmp_path / "missing.ckpt"))


def test_a_teacher_checkpoint_that_is_not_one_is_named(tmp_path):
    _files(tmp_path)
    kd = KnowledgeDistillation(teacher=str(tmp_path / "truncated.ckpt"))
    with pytest.raises(CheckpointError, match="teacher checkpoint .*truncated.ckpt cannot be read"):
        kd._build_teacher(build_network(SMP_UNET, num_classes=4), torch.randn(1, 3, 64, 64))
