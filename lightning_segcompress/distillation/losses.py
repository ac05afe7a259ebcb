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


def _label_map(target: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``B x H x W`` labels nearest-resized to ``size`` (as the official IFVD / CIRKD code does), int64."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target.long()
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _regions(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(keep, region, R)``: the mask of non-ignored positions of ``B x H x W`` labels and, for each kept
    position (in ``labels[keep]`` order), the index in ``[0, R)`` of its region = one (image, class) pair."""
    keep = labels != ignore_index
    if not keep.any():
        return keep, labels.new_zeros(0), 0
    classes = labels[keep]
    low = classes.min()
    span = classes.max() - low + 1
    batch_index = torch.arange(labels.shape[0], device=labels.device)[:, None, None].expand_as(labels)[keep]
    # one integer key per (image, class) pair, numbered 0..R-1 in sorted order
    unique, region = torch.unique(batch_index * span + (classes - low), return_inverse=True)
    return keep, region, unique.shape[0]


def _region_means(pixels: torch.Tensor, region: torch.Tensor, count: int) -> torch.Tensor:
    """``count x C`` mean of the ``N x C`` rows of ``pixels`` per region index."""
    sums = pixels.new_zeros(count, pixels.shape[1]).index_add(0, region, pixels)
    sizes = torch.bincount(region, minlength=count).clamp(min=1).to(pixels.dtype)
    return sums / sizes[:, None]


def _pooled(features: torch.Tensor, max_pixels: int | None) -> torch.Tensor:
    """``features`` adaptive-average-pooled to the largest grid of (about) the same aspect ratio with at most
    ``max_pixels`` positions per image; unchanged when it already has no more (or ``max_pixels`` is None)."""
    h, w = features.shape[-2:]
    if max_pixels is None or h * w <= max_pixels:
        return features
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}.")
    scale = math.sqrt(max_pixels / (h * w))
    size = (max(1, min(h, math.floor(h * scale))), max(1, min(w, math.floor(w * scale))))
    return F.adaptive_avg_pool2d(features, size)


def ifvd(student_features: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor,
         ignore_index: int = 255) -> torch.Tensor:
    """Intra-class feature variation distillation, IFVD (Wang et al., ECCV 2020, "Intra-class Feature Variation
    Distillation for Semantic Segmentation"; official code github.com/YukangWang/IFVD, ``CriterionIFV``).

    The labels are nearest-resized to the feature map. Per image and class, the prototype ``p_k`` is the mean
    feature of that class's pixels; the IFV map is ``m_i = cos(f_i, p_{y_i})`` and
    ``loss = mean over non-ignored pixels of (m^S_i - m^T_i)^2``. Prototypes and cosines are taken in each
    network's own feature space, so the channel counts may differ (no connector). Classes absent from an image
    simply have no prototype there. Zero (with ``grad_fn``) when every pixel is ignored.

    The official code averages over all pixels, ignored ones included (their IFV is 1 in both maps, so they add
    zeros to the sum); this mean runs over the non-ignored pixels only, i.e. it is larger by ``all / non-ignored``.

    Args:
        student_features: ``B x C_s x H_s x W_s``; resized bilinearly to the teacher's ``H x W`` if different.
        teacher_features: ``B x C_t x H x W``.
        target: labels ``B x H' x W'`` (int64); every value other than ``ignore_index`` is a class.
    """
    teacher = teacher_features.float()
    student = _resize(student_features.float(), teacher.shape[-2:])
    keep, region, count = _regions(_label_map(target, teacher.shape[-2:]), ignore_index)
    if not keep.any():
        return _zero(student)

    def variation(features: torch.Tensor) -> torch.Tensor:
        pixels = features.permute(0, 2, 3, 1)[keep]  # N x C, the non-ignored pixels
        prototypes = _region_means(pixels, region, count)
        return F.cosine_similarity(pixels, prototypes[region], dim=1, eps=1e-8)

    return F.mse_loss(variation(student), variation(teacher))


def _unit_pixels(student_features: torch.Tensor, teacher_features: torch.Tensor,
                 max_pixels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the teacher's size (student resized bilinearly), pooled to ``max_pixels`` and L2-normalised
    along the channels: ``B x C x h x w`` each."""
    teacher = teacher_features.float()
    student = _resize(student_features.float(), teacher.shape[-2:])
    student, teacher = _pooled(student, max_pixels), _pooled(teacher, max_pixels)
    return F.normalize(student, p=2, dim=1), F.normalize(teacher, p=2, dim=1)


def cirkd_pixel(student_features: torch.Tensor, teacher_features: torch.Tensor, temperature: float = 0.1,
                max_pixels: int | None = 1024) -> torch.Tensor:
    """Cross-image pixel-to-pixel relation distillation, the mini-batch part of CIRKD (Yang et al., CVPR 2022,
    "Cross-Image Relational Knowledge Distillation for Semantic Segmentation"; official code github.com/winycg/CIRKD,
    ``CriterionMiniBatchCrossImagePair``).

    With ``f`` the L2-normalised pixel embeddings, for every ordered pair of images ``(i, j)`` of the batch (``i = j``
    included) ``S_ij = f_i f_j^T / tau`` (``N x N``, ``N`` pixels per image); each row becomes a distribution over
    image ``j``'s pixels and ``loss = 1 / (B^2 N) * sum_{i,j,rows} KL(softmax(S^T_ij) || softmax(S^S_ij))`` (the
    official ``batchmean`` KL averaged over the ``B^2`` pairs, no ``tau^2`` factor). Channel counts may differ.

    This is an in-batch reconstruction: the official CIRKD also keeps memory banks across batches (a pixel queue
    and a region queue of teacher embeddings, with a learnable projection of the student), which are not kept here;
    see :func:`cirkd_region` for the in-batch pixel-to-region part.

    Args:
        student_features: ``B x C_s x H_s x W_s``; resized bilinearly to the teacher's ``H x W`` if different.
        teacher_features: ``B x C_t x H x W``.
        temperature: ``tau``; 0.1 is the official ``--contrast-temperature``.
        max_pixels: maps with more than this many positions per image are first average-pooled (adaptively, keeping
            the aspect ratio) to at most that many, bounding memory (``B^2 N^2`` similarities per network). None
            pools nothing, as the official default does on its 1/8-resolution features (its ``pooling=True`` is a
            2x2 average pool).
    """
    student, teacher = _unit_pixels(student_features, teacher_features, max_pixels)
    b = student.shape[0]
    student, teacher = student.flatten(2), teacher.flatten(2)  # B x C x N
    n = student.shape[-1]
    # B x B x N x N: row (i, j, p) holds the similarities of pixel p of image i to every pixel of image j.
    s_sim = torch.einsum("icn,jcm->ijnm", student, student) / temperature
    t_sim = torch.einsum("icn,jcm->ijnm", teacher, teacher) / temperature
    kl = F.kl_div(F.log_softmax(s_sim, dim=-1), F.log_softmax(t_sim, dim=-1), reduction="sum", log_target=True)
    return kl / (b * b * n)


def cirkd_region(student_features: torch.Tensor, teacher_features: torch.Tensor, target: torch.Tensor,
                 temperature: float = 0.1, max_pixels: int | None = 1024, ignore_index: int = 255) -> torch.Tensor:
    """Cross-image pixel-to-region relation distillation after CIRKD (Yang et al., CVPR 2022; official code
    github.com/winycg/CIRKD, the region part of ``StudentSegContrast``), reconstructed within the mini-batch.

    The labels are nearest-resized to the (pooled) feature map. A region is one class in one image of the batch;
    its embedding ``r`` is the L2-normalised mean of the L2-normalised pixel embeddings of that class there. For every
    non-ignored pixel ``f``, ``softmax_r(f . r / tau)`` over all regions of the batch is its relation
    distribution; ``loss = mean over non-ignored pixels of KL(teacher's || student's)`` (the official KD temperature
    on these relations is 1, so no further scaling). Each network relates its own pixels to its own regions, so the
    channel counts may differ. Zero (with ``grad_fn``) when every pixel is ignored.

    The official method instead draws the regions from a memory bank of the teacher's region embeddings collected
    across batches, and maps the student's pixels into the teacher's space with a learnable projection head.

    Args:
        student_features: ``B x C_s x H_s x W_s``; resized bilinearly to the teacher's ``H x W`` if different.
        teacher_features: ``B x C_t x H x W``.
        target: labels ``B x H' x W'`` (int64); every value other than ``ignore_index`` is a class.
        temperature: ``tau``; 0.1 is the official ``--contrast-temperature``.
        max_pixels: as in :func:`cirkd_pixel` (the official memory part average-pools 2x2 first).
    """
    student, teacher = _unit_pixels(student_features, teacher_features, max_pixels)
    keep, region, count = _regions(_label_map(target, teacher.shape[-2:]), ignore_index)
    if not keep.any():
        return _zero(student)

    def log_relations(features: torch.Tensor) -> torch.Tensor:
        pixels = features.permute(0, 2, 3, 1)[keep]  # N x C, unit length
        regions = F.normalize(_region_means(pixels, region, count), p=2, dim=1)
        return F.log_softmax(pixels @ regions.T / temperature, dim=1)

    kl = F.kl_div(log_relations(student), log_relations(teacher), reduction="batchmean", log_target=True)
    return kl


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


LOSSES = {"pixel_kl": pixel_kl, "cwd": channel_wise, "pairwise": pairwise_affinity, "ace": ace, "ifvd": ifvd,
          "cirkd_pixel": cirkd_pixel, "cirkd_region": cirkd_region}

# Per-loss default options, from the publications: pixel KD weight 10 with T=1 (Liu et al.), CWD T=4 weight 3
# (Shu et al.), pair-wise weight 0.5-1 (Liu et al.), ACE kappa 0.3 (Haas et al.), IFVD weight 200 (the official
# code's --lambda-ifv), CIRKD tau 0.1 with weight 1 for the mini-batch pixel relations and 0.1 for the region
# relations (the official --contrast-temperature, --lambda-minibatch-pixel and --lambda-memory-region).
# max_pixels (a memory bound of this package, not of CIRKD) pools to at most 32 x 32 positions per image.
DEFAULTS = {
    "pixel_kl": {"weight": 10.0, "temperature": 1.0},
    "cwd": {"weight": 3.0, "temperature": 4.0},
    "pairwise": {"weight": 1.0, "pool_scale": 0.5},
    "ace": {"weight": 1.0, "kappa": 0.3},
    "ifvd": {"weight": 200.0},
    "cirkd_pixel": {"weight": 1.0, "temperature": 0.1, "max_pixels": 1024},
    "cirkd_region": {"weight": 0.1, "temperature": 0.1, "max_pixels": 1024},
}
