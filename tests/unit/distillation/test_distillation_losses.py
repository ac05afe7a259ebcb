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
    cirkd_pixel,
    cirkd_region,
    feature_hint,
    ifvd,
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
    assert set(LOSSES) == set(DEFAULTS) == {"pixel_kl", "cwd", "pairwise", "ace", "ifvd", "cirkd_pixel",
                                            "cirkd_region"}
    assert DEFAULTS["pixel_kl"] == {"weight": 10.0, "temperature": 1.0}
    assert DEFAULTS["cwd"]["temperature"] == 4.0 and DEFAULTS["ace"]["kappa"] == 0.3
    assert DEFAULTS["ifvd"] == {"weight": 200.0}
    assert DEFAULTS["cirkd_pixel"] == {"weight": 1.0, "temperature": 0.1, "max_pixels": 1024}
    assert DEFAULTS["cirkd_region"] == {"weight": 0.1, "temperature": 0.1, "max_pixels": 1024}


# ---- relation-based losses: IFVD and CIRKD ------------------------------------------------------------------------

# KL(softmax([1, 0]) || [0.5, 0.5]): a teacher relation row of cosines [1, 0] against a uniform student row, tau = 1.
P_E = math.e / (1 + math.e)
KL_E = P_E * math.log(P_E / 0.5) + (1 - P_E) * math.log((1 - P_E) / 0.5)


def _features(*vectors):
    """``1 x C x 1 x N`` feature map from N channel vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, len(vectors[0]), 1, len(vectors))


def _official_cirkd_pixel(student, teacher, tau):
    """The official CriterionMiniBatchCrossImagePair loop (no pooling), for reference."""
    student, teacher = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    b = student.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            s = student[i].flatten(1).T @ student[j].flatten(1)
            t = teacher[i].flatten(1).T @ teacher[j].flatten(1)
            total = total + F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")
    return total / (b * b)


@pytest.fixture
def scene():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    return torch.randn(2, 5, 4, 4), torch.randn(2, 7, 4, 4), target


def test_relation_losses_identical_inputs_give_zero(scene):
    features, _, target = scene
    assert ifvd(features, features, target).item() == pytest.approx(0.0, abs=1e-7)
    assert cirkd_pixel(features, features).item() == pytest.approx(0.0, abs=1e-6)
    assert cirkd_region(features, features, target).item() == pytest.approx(0.0, abs=1e-6)
    # channel-agnostic: duplicated channels leave every cosine, prototype direction and relation unchanged
    doubled = torch.cat([features, features], 1)
    assert ifvd(features, doubled, target).item() == pytest.approx(0.0, abs=1e-7)
    assert cirkd_pixel(features, doubled).item() == pytest.approx(0.0, abs=1e-5)
    assert cirkd_region(features, doubled, target).item() == pytest.approx(0.0, abs=1e-5)


def test_relation_losses_take_different_channel_counts(scene):
    student, teacher, target = scene
    assert student.shape[1] != teacher.shape[1]
    assert ifvd(student, teacher, target).item() > 1e-3
    assert cirkd_pixel(student, teacher).item() > 1e-3
    assert cirkd_region(student, teacher, target).item() > 1e-3


def test_ifvd_hand_computed():
    # Pixels labelled [0, 0, 1]. Student: class-0 prototype (0.5, 0.5), so both class-0 pixels have IFV cos 45deg;
    # teacher: both class-0 pixels equal their prototype (IFV 1). Class 1 has one pixel, its own prototype (IFV 1).
    student = _features([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    teacher = _features([1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0])  # 3 channels
    target = torch.tensor([[[0, 0, 1]]])
    expected = 2 * (1 - 1 / math.sqrt(2)) ** 2 / 3
    assert ifvd(student, teacher, target).item() == pytest.approx(expected, rel=1e-5)
    # prototypes are per image: the two class-0 pixels in one image differ as above, but in two images each pixel
    # is its own image's prototype (IFV 1 in both networks)
    s0, s1 = _features([1.0, 0.0]), _features([0.0, 1.0])
    t0 = _features([1.0, 0.0, 0.0])
    one_image = ifvd(torch.cat([s0, s1], -1), torch.cat([t0, t0], -1), torch.tensor([[[0, 0]]]))
    assert one_image.item() == pytest.approx((1 - 1 / math.sqrt(2)) ** 2, rel=1e-5)
    two_images = ifvd(torch.cat([s0, s1]), torch.cat([t0, t0]), torch.tensor([[[0]], [[0]]]))
    assert two_images.item() == pytest.approx(0.0, abs=1e-7)


def test_ifvd_ignore_label_excluded_and_all_ignored():
    student = _features([1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -7.0])
    teacher = _features([1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0])
    target = torch.tensor([[[0, 0, 1, 255]]])
    expected = 2 * (1 - 1 / math.sqrt(2)) ** 2 / 3  # the ignored pixel is neither in a prototype nor in the mean
    assert ifvd(student, teacher, target).item() == pytest.approx(expected, rel=1e-5)
    assert ifvd(student, teacher, torch.tensor([[[0, 0, 1, 9]]]), ignore_index=9).item() == pytest.approx(
        expected, rel=1e-5)

    leaf = student.clone().requires_grad_()
    zero = ifvd(leaf, teacher, torch.full((1, 1, 4), 255))
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert leaf.grad is not None
    zero = cirkd_region(leaf, teacher, torch.full((1, 1, 4), 255))
    assert zero.item() == 0.0 and zero.grad_fn is not None


def test_ifvd_labels_nearest_resized_and_student_resized_to_teacher(scene):
    student, teacher, target = scene  # labels 8x8, features 4x4
    small = target[:, ::2, ::2]  # what nearest downsampling by 2 picks
    assert ifvd(student, teacher, target).item() == pytest.approx(ifvd(student, teacher, small).item(), rel=1e-6)
    half = student[..., ::2, ::2].contiguous()
    up = F.interpolate(half, size=(4, 4), mode="bilinear", align_corners=False)
    assert ifvd(half, teacher, target).item() == pytest.approx(ifvd(up, teacher, target).item(), rel=1e-6)


def test_cirkd_pixel_hand_computed():
    # One image, two pixels, tau = 1. Student pixels parallel: every row uniform. Teacher pixels orthogonal: rows
    # softmax([1, 0]) and softmax([0, 1]); both rows have KL_E, the mean over rows is KL_E.
    student = _features([1.0, 0.0], [2.0, 0.0])
    teacher = _features([1.0, 0.0, 0.0], [0.0, 0.0, 3.0])
    assert cirkd_pixel(student, teacher, temperature=1.0).item() == pytest.approx(KL_E, rel=1e-5)
    # tau scales the cosines before the softmax (no tau^2 factor, as in the official code)
    p = 1 / (1 + math.exp(-10))
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert cirkd_pixel(student, teacher, temperature=0.1).item() == pytest.approx(kl, rel=1e-5)


def test_cirkd_pixel_matches_the_official_pairwise_loop(scene):
    student, teacher, _ = scene
    expected = _official_cirkd_pixel(student, teacher, 0.1)
    assert cirkd_pixel(student, teacher, max_pixels=None).item() == pytest.approx(expected.item(), rel=1e-5)
    # cross-image: the relations to the other image matter (not the sum of per-image losses)
    per_image = sum(cirkd_pixel(student[i:i + 1], teacher[i:i + 1], max_pixels=None) for i in range(2)) / 2
    assert cirkd_pixel(student, teacher, max_pixels=None).item() != pytest.approx(per_image.item(), rel=1e-3)


def test_cirkd_pooling_bounds_the_pixels_and_resizes_the_student(scene):
    student, teacher, target = scene  # 16 positions per image
    pooled = (F.adaptive_avg_pool2d(student, 2), F.adaptive_avg_pool2d(teacher, 2))
    assert cirkd_pixel(student, teacher, max_pixels=4).item() == pytest.approx(
        cirkd_pixel(*pooled, max_pixels=None).item(), rel=1e-5)
    assert cirkd_pixel(student, teacher, max_pixels=16).item() == pytest.approx(
        cirkd_pixel(student, teacher, max_pixels=None).item(), rel=1e-6)
    half = student[..., ::2, ::2].contiguous()
    up = F.interpolate(half, size=(4, 4), mode="bilinear", align_corners=False)
    assert cirkd_pixel(half, teacher).item() == pytest.approx(cirkd_pixel(up, teacher).item(), rel=1e-6)
    assert cirkd_region(half, teacher, target).item() == pytest.approx(
        cirkd_region(up, teacher, target).item(), rel=1e-6)
    # wide maps keep their aspect ratio: 4 x 64 with max_pixels=64 pools to 2 x 32
    wide = torch.randn(1, 3, 4, 64)
    assert cirkd_pixel(wide, wide.flip(-1), max_pixels=64).item() == pytest.approx(
        cirkd_pixel(F.adaptive_avg_pool2d(wide, (2, 32)), F.adaptive_avg_pool2d(wide.flip(-1), (2, 32)),
                    max_pixels=None).item(), rel=1e-5)


def test_cirkd_region_hand_computed_and_ignore():
    # Two pixels, classes 0 and 1, tau = 1: each region is its own pixel's direction. Student pixels parallel: both
    # regions equal, rows uniform; teacher orthogonal: rows softmax([1, 0]) and softmax([0, 1]) -> KL_E.
    student = _features([1.0, 0.0], [2.0, 0.0], [0.0, 5.0])
    teacher = _features([1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 4.0, 0.0])
    target = torch.tensor([[[0, 1, 255]]])
    assert cirkd_region(student, teacher, target, temperature=1.0).item() == pytest.approx(KL_E, rel=1e-5)
    # regions are per (image, class): the two pixels in two images, both labelled 0, are again two regions, and
    # each pixel relates to the other image's region too (cross-image)
    split = cirkd_region(torch.cat([student[..., :1], student[..., 1:2]]), torch.cat([teacher[..., :1],
                         teacher[..., 1:2]]), torch.tensor([[[0]], [[0]]]), temperature=1.0)
    assert split.item() == pytest.approx(KL_E, rel=1e-5)


@pytest.mark.parametrize("name", ["ifvd", "cirkd_pixel", "cirkd_region"])
def test_relation_losses_gradients_reach_student_only(name, scene):
    student_features, teacher_features, target = scene
    student = student_features.clone().requires_grad_()
    teacher = teacher_features.clone().requires_grad_()
    labels = (target,) if name != "cirkd_pixel" else ()
    loss = LOSSES[name](student, teacher.detach(), *labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert student.grad is not None and student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()
    assert teacher.grad is None
    # bfloat16 inputs are computed in float32
    assert LOSSES[name](student_features.bfloat16(), teacher_features.bfloat16(), *labels).dtype == torch.float32
