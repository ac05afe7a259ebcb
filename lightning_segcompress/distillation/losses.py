"""Distillation losses for semantic segmentation. Pure torch.

All functions take ``B x C x H x W`` tensors and return a scalar that is differentiable w.r.t. the student.
Teacher arguments are treated as constants: callers pass them detached. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of ``B x C x H x W`` to ``size`` unless it already has it."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _zero(student: torch.Tensor) -> torch.Tensor:
    # A zero that stays attached to the graph, so callers can always backward through the total loss.
    return student.float().sum() * 0


def pixel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise distillation (Liu et al., CVPR 2019).

    ``loss = T^2 * mean_pixels KL(softmax(z_T / T) || softmax(z_S / T))``, the softmax and KL taken over classes.

    Args:
        student: student logits ``B x C x H x W``.
        teacher: teacher logits ``B x C x H' x W'``; resized bilinearly to the student's size if different.
        temperature: softmax temperature ``T``.
        valid: optional bool mask ``B x H x W``; the mean runs over valid pixels only (nearest-resized to the
            student's size if needed). Zero (with ``grad_fn``) when no pixel is valid.
    """
    student, teacher = student.float(), _resize(teacher.float(), student.shape[-2:])
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    per_pixel = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)
    if valid is not None:
        if tuple(valid.shape[-2:]) != tuple(student.shape[-2:]):
            valid = F.interpolate(valid[:, None].float(), size=student.shape[-2:], mode="nearest")[:, 0] > 0.5
        valid = valid.bool()
        if not valid.any():
            return _zero(student)
        per_pixel = per_pixel[valid]
    return temperature**2 * per_pixel.mean()


def channel_wise(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation, CWD (Shu et al., ICCV 2021).

    Each channel is turned into a distribution over its ``H*W`` positions, ``phi_c = softmax(y_c / T)``, and
    ``loss = T^2 / (B*C) * sum_{b,c} KL(phi_T,c || phi_S,c)``. The teacher is resized to the student's size.

    Raises:
        ValueError: the channel counts differ.
    """
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"channel_wise needs equal channel counts: student has {student.shape[1]}, "
                         f"teacher has {teacher.shape[1]}.")
    student, teacher = student.float(), _resize(teacher.float(), student.shape[-2:])
    b, c = student.shape[:2]
    log_p_s = F.log_softmax(student.reshape(b, c, -1) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.reshape(b, c, -1) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return temperature**2 * kl / (b * c)


def _affinity(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B x N x N`` cosine similarities between the feature vectors of the ``N`` pooled positions."""
    pooled = F.adaptive_max_pool2d(features.float(), size).flatten(2)  # B x C x N
    pooled = F.normalize(pooled, dim=1, eps=1e-8)
    return pooled.transpose(1, 2) @ pooled


def pairwise_affinity(student_features: torch.Tensor, teacher_features: torch.Tensor,
                      pool_scale: float = 0.5) -> torch.Tensor:
    """Pair-wise distillation (Liu et al., CVPR 2019).

    Both maps are max-pooled to ``(ceil(H_s * s), ceil(W_s * s))`` (at least 1) from the student's size ``H_s x W_s``;
    with ``f_i`` the channel vector at pooled position ``i``, ``a_ij = f_i . f_j / (|f_i| |f_j|)`` and
    ``loss = mean_{b,i,j} (a^S_ij - a^T_ij)^2``. Channel counts may differ: both matrices are ``N x N``.
    """
    h, w = student_features.shape[-2:]
    size = (max(1, math.ceil(h * pool_scale)), max(1, math.ceil(w * pool_scale)))
    return F.mse_loss(_affinity(student_features, size), _affinity(teacher_features, size))


def ace(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, kappa: float = 0.3,
        ignore_index: int = 255) -> torch.Tensor:
    """Adaptive cross-entropy distillation, ACE (Haas et al., shunt connections).

    Per pixel with label ``y``: ``t = kappa * softmax(z_T) + (1 - kappa) * onehot(y)`` where ``argmax(z_T) == y``,
    otherwise ``t = onehot(y)``; ``loss = mean over non-ignored pixels of -sum_c t_c * log_softmax(z_S)_c``.
    With ``kappa = 0`` this is ``F.cross_entropy(student, target, ignore_index=ignore_index)``.

    Args:
        student: student logits ``B x C x H x W``; resized bilinearly to the target's size if different.
        teacher: teacher logits ``B x C x H' x W'``; likewise resized to the target's size.
        target: labels ``B x H x W`` (int64) in ``[0, C)`` or ``ignore_index``.

    Raises:
        ValueError: a label is outside ``[0, C)`` and is not ``ignore_index``.
    """
    size = target.shape[-2:]
    student, teacher = _resize(student.float(), size), _resize(teacher.float(), size)
    num_classes = student.shape[1]
    keep = target != ignore_index
    labels = target[keep]
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"ace: label {int(bad[0])} is outside [0, {num_classes}) for {num_classes} classes and is "
                         f"not ignore_index={ignore_index}.")
    if not keep.any():
        return _zero(student)
    # Classes last: N x C over the kept pixels.
    log_p_s = student.permute(0, 2, 3, 1)[keep].log_softmax(dim=-1)
    teacher = teacher.permute(0, 2, 3, 1)[keep]
    onehot = F.one_hot(labels, num_classes).float()
    agree = (teacher.argmax(dim=-1) == labels)[:, None]
    soft = kappa * teacher.softmax(dim=-1) + (1 - kappa) * onehot
    t = torch.where(agree, soft, onehot)
    return -(t * log_p_s).sum(dim=-1).mean()


def feature_hint(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Feature hint: ``mean((F_S - F_T)^2)``, the student resized bilinearly to the teacher's size if different.

    Raises:
        ValueError: the channel counts differ (map the student through a :class:`Connector` first).
    """
    if student_features.shape[1] != teacher_features.shape[1]:
        raise ValueError(f"feature_hint needs equal channel counts: student has {student_features.shape[1]}, "
                         f"teacher has {teacher_features.shape[1]}; use a connector (make_connector) to map the "
                         "student's channels to the teacher's.")
    student = _resize(student_features.float(), teacher_features.shape[-2:])
    return F.mse_loss(student, teacher_features.float())


class Connector(nn.Module):
    """Learnable 1x1 convolution (no bias) + BatchNorm mapping student features to the teacher's channel count."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def make_connector(in_channels: int, out_channels: int) -> nn.Module:
    """``nn.Identity()`` when the channel counts match, else a :class:`Connector`."""
    return nn.Identity() if in_channels == out_channels else Connector(in_channels, out_channels)


LOSSES = {"pixel_kl": pixel_kl, "cwd": channel_wise, "pairwise": pairwise_affinity, "ace": ace}

# Per-loss default options, from the publications: pixel KD weight 10 with T=1 (Liu et al.), CWD T=4 weight 3
# (Shu et al.), pair-wise weight 0.5-1 (Liu et al.), ACE kappa 0.3 (Haas et al.).
DEFAULTS = {
    "pixel_kl": {"weight": 10.0, "temperature": 1.0},
    "cwd": {"weight": 3.0, "temperature": 4.0},
    "pairwise": {"weight": 1.0, "pool_scale": 0.5},
    "ace": {"weight": 1.0, "kappa": 0.3},
}
