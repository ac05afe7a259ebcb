import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_segcompress.distillation.losses import (
    DEFAULTS,
    LOSSES,
    Connector,
    ace,
    channel_wise,
    feature_hint,
    make_connector,
    pairwise_affinity,
    pixel_kl,
)

# KL([0.75, 0.25] || [0.5, 0.5]): the teacher logits [ln 3, 0] against uniform student logits.
KL_3_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(2, 3, 4, 4)


def test_identical_inputs_give_zero(logits):
    assert pixel_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert channel_wise(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert pairwise_affinity(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_hint(logits, logits).item() == 0.0


def test_pixel_kl_hand_computed():
    student = torch.tensor([0.0, 0.0]).reshape(1, 2, 1, 1)
    teacher = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1)
    assert KL_3_1 == pytest.approx(0.130812, abs=1e-6)
    assert pixel_kl(student, teacher).item() == pytest.approx(KL_3_1, rel=1e-5)


def test_pixel_kl_temperature_scaling(logits):
    teacher = torch.randn_like(logits)
    t = 2.5
    direct = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher / t, 1), reduction="none").sum(1).mean()
    assert pixel_kl(logits, teacher, temperature=t).item() == pytest.approx(t**2 * direct.item(), rel=1e-5)
    assert pixel_kl(logits, teacher, temperature=t).item() != pytest.approx(direct.item(), rel=1e-3)


def test_pixel_kl_valid_mask(logits):
    teacher = torch.randn_like(logits)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[0, 1, 2] = False
    valid[1, :, 0] = False
    loss = pixel_kl(logits, teacher, valid=valid)

    changed = logits.clone()
    changed[0, :, 1, 2] += torch.tensor([5.0, -3.0, 1.0])
    changed[1, :, :, 0] = 10.0
    assert pixel_kl(changed, teacher, valid=valid).item() == pytest.approx(loss.item(), rel=1e-6)
    assert pixel_kl(changed, teacher).item() != pytest.approx(pixel_kl(logits, teacher).item(), rel=1e-3)

    per_pixel = F.kl_div(F.log_softmax(logits, 1), F.softmax(teacher, 1), reduction="none").sum(1)
    assert loss.item() == pytest.approx(per_pixel[valid].mean().item(), rel=1e-5)


def test_pixel_kl_valid_mask_resized_and_empty(logits):
    teacher = torch.randn_like(logits)
    half = torch.ones(2, 2, 2, dtype=torch.bool)
    half[:, 0, 0] = False  # nearest upsampling masks the top-left 2x2 block
    full = torch.ones(2, 4, 4, dtype=torch.bool)
    full[:, :2, :2] = False
    assert pixel_kl(logits, teacher, valid=half).item() == pytest.approx(
        pixel_kl(logits, teacher, valid=full).item(), rel=1e-6)

    student = logits.clone().requires_grad_()
    zero = pixel_kl(student, teacher, valid=torch.zeros(2, 4, 4, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert student.grad is not None


def test_teacher_at_half_resolution_is_upsampled(logits):
    teacher = torch.randn(2, 3, 2, 2)
    up = F.interpolate(teacher, size=(4, 4), mode="bilinear", align_corners=False)
    assert pixel_kl(logits, teacher).item() == pytest.approx(pixel_kl(logits, up).item(), rel=1e-6)
    assert channel_wise(logits, teacher).item() == pytest.approx(channel_wise(logits, up).item(), rel=1e-6)


def test_cwd_hand_computed():
    # One channel over two positions: phi_S = [0.5, 0.5], phi_T = softmax([4 ln 3, 0] / 4) = [0.75, 0.25].
    student = torch.tensor([0.0, 0.0]).reshape(1, 1, 2, 1)
    teacher = torch.tensor([4 * math.log(3.0), 0.0]).reshape(1, 1, 2, 1)
    assert channel_wise(student, teacher, temperature=4.0).item() == pytest.approx(16 * KL_3_1, rel=1e-5)
    # Averaged over B*C: a second, identical channel halves the loss.
    two = channel_wise(torch.cat([student, student], 1), torch.cat([teacher, student], 1), temperature=4.0)
    assert two.item() == pytest.approx(8 * KL_3_1, rel=1e-5)


def test_cwd_channel_mismatch(logits):
    with pytest.raises(ValueError, match=r"student has 3.*teacher has 5"):
        channel_wise(logits, torch.randn(2, 5, 4, 4))


def test_pairwise_channel_count_invariance_and_structure(logits):
    # Duplicating channels leaves every cosine similarity unchanged.
    assert pairwise_affinity(logits, torch.cat([logits, logits], 1)).item() == pytest.approx(0.0, abs=1e-6)
    assert pairwise_affinity(logits, torch.randn(2, 7, 4, 4)).item() > 1e-3
    # Different spatial sizes are pooled to the same grid.
    assert pairwise_affinity(logits, torch.randn(2, 7, 8, 8)).item() > 1e-3


def test_pairwise_hand_computed():
    # pool_scale=1 keeps both positions; student vectors are parallel (a_01 = 1), teacher's orthogonal (a_01 = 0).
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    assert pairwise_affinity(student, teacher, pool_scale=1.0).item() == pytest.approx(0.5, rel=1e-5)


def test_ace_kappa_zero_is_cross_entropy(logits):
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = 255
    target[1, 2, 3] = 255
    teacher = torch.randn_like(logits)
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert ace(logits, teacher, target, kappa=0.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ace_teacher_disagreeing_has_no_influence():
    student = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    teacher = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)  # predicts class 1
    target = torch.tensor([[[0]]])
    expected = math.log(1 + math.e) - 1  # CE of [1, 0] to class 0
    assert ace(student, teacher, target, kappa=0.3).item() == pytest.approx(expected, rel=1e-5)
    assert ace(student, teacher, target, kappa=0.3).item() == pytest.approx(
        F.cross_entropy(student, target).item(), rel=1e-5)


def test_ace_teacher_agreeing_hand_computed():
    student = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    teacher = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1)  # softmax [0.75, 0.25], predicts class 0
    target = torch.tensor([[[0]]])
    # t = 0.3 * [0.75, 0.25] + 0.7 * [1, 0] = [0.925, 0.075]; log_softmax(student) = [1, 0] - ln(1 + e).
    expected = -(0.925 * (1 - math.log(1 + math.e)) + 0.075 * -math.log(1 + math.e))
    assert ace(student, teacher, target, kappa=0.3).item() == pytest.approx(expected, rel=1e-5)


def test_ace_resizes_logits_to_target(logits):
    target = torch.randint(0, 3, (2, 8, 8))
    teacher = torch.randn_like(logits)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert ace(logits, teacher, target, kappa=0.0).item() == pytest.approx(
        F.cross_entropy(up, target).item(), rel=1e-5)


def test_ace_bad_label_and_all_ignored(logits):
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[1, 1, 1] = 7
    with pytest.raises(ValueError, match=r"label 7 .*\[0, 3\)"):
        ace(logits, logits, target)
    target[1, 1, 1] = -1
    with pytest.raises(ValueError, match="label -1"):
        ace(logits, logits, target)

    student = logits.clone().requires_grad_()
    zero = ace(student, logits, torch.full((2, 4, 4), 255))
    assert zero.item() == 0.0 and zero.grad_fn is not None


@pytest.mark.parametrize("name", ["pixel_kl", "cwd", "pairwise", "ace", "hint"])
def test_gradients_reach_student_only(name, logits):
    student = logits.clone().requires_grad_()
    teacher = torch.randn_like(logits, requires_grad=True)
    if name == "hint":
        loss = feature_hint(student, teacher.detach())
    elif name == "ace":
        loss = ace(student, teacher.detach(), torch.randint(0, 3, (2, 4, 4)))
    else:
        loss = LOSSES[name](student, teacher.detach())
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_half_precision_computed_in_float32(logits):
    loss = pixel_kl(logits.bfloat16(), torch.randn_like(logits).bfloat16())
    assert loss.dtype == torch.float32


def test_feature_hint_resize_and_channel_mismatch():
    student, teacher = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 4, 4)
    up = F.interpolate(student, size=(4, 4), mode="bilinear", align_corners=False)
    assert feature_hint(student, teacher).item() == pytest.approx(F.mse_loss(up, teacher).item(), rel=1e-6)
    with pytest.raises(ValueError, match="connector"):
        feature_hint(torch.randn(1, 3, 4, 4), teacher)


def test_connector():
    connector = Connector(3, 5)
    assert connector(torch.randn(2, 3, 4, 4)).shape == (2, 5, 4, 4)
    assert isinstance(connector.conv, nn.Conv2d) and connector.conv.bias is None
    assert isinstance(make_connector(4, 4), nn.Identity)
    assert isinstance(make_connector(3, 5), Connector)


def test_registry_and_defaults():
    assert set(LOSSES) == set(DEFAULTS) == {"pixel_kl", "cwd", "pairwise", "ace"}
    assert DEFAULTS["pixel_kl"] == {"weight": 10.0, "temperature": 1.0}
    assert DEFAULTS["cwd"]["temperature"] == 4.0 and DEFAULTS["ace"]["kappa"] == 0.3
