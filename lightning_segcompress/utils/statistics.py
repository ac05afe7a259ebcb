"""Statistics users can trust: per-image confusion matrices, per-class IoU, a paired bootstrap over validation
images for the mIoU difference between two networks, and Student-t intervals over seeds. Pure torch + numpy
(scipy for t quantiles where installed; a table otherwise).

Conventions:

* A confusion matrix is ``[C, C]`` int64 with rows = ground truth and columns = prediction (torchmetrics'
  order); pixels whose mask is ``ignore_index`` are left out. A stack ``[N, C, C]`` holds one matrix per image.
* The mIoU of a set of images is the dataset-level one: the images' matrices are summed, IoU per class is
  ``tp / (tp + fp + fn)`` on the sum, and the mean is over the classes present in ground truth or prediction —
  exactly torchmetrics' ``MulticlassJaccardIndex`` (``average="macro"``) and :func:`~.metrics.miou_evaluator`.
* Differences are always ``b - a`` (the second argument minus the first): positive means ``b`` is higher.
  A verdict is ``"no measurable difference"`` when the interval covers 0, else ``"better"`` (the whole interval
  above 0) or ``"worse"`` (below 0) — "better" assuming higher is better, as for mIoU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from lightning_segcompress.utils.metrics import logits_at_masks

NO_DIFFERENCE = "no measurable difference"

# ---- confusion matrices -----------------------------------------------------------------------------------------


def confusion_matrices(predictions: torch.Tensor, masks: torch.Tensor, num_classes: int,
                       ignore_index: int | None = 255) -> torch.Tensor:
    """One ``[C, C]`` confusion matrix per image (rows: ground truth, columns: prediction) of class maps
    ``predictions`` and ``masks``, both ``[N, H, W]``: ``[N, C, C]`` int64 on the inputs' device. Pixels labelled
    ``ignore_index`` are left out; any other label outside ``[0, num_classes)`` is an error."""
    if predictions.shape != masks.shape or predictions.dim() < 2:
        raise ValueError(f"predictions and masks must be class maps of the same shape [N, H, W], got "
                         f"{tuple(predictions.shape)} and {tuple(masks.shape)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    n = predictions.shape[0]
    predictions, masks = predictions.reshape(n, -1).long(), masks.reshape(n, -1).long()
    valid = masks != ignore_index if ignore_index is not None else torch.ones_like(masks, dtype=torch.bool)
    labels, predicted = masks[valid], predictions[valid]
    for name, values in (("mask", labels), ("prediction", predicted)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"a {name} value is outside [0, {num_classes}) and is not ignore_index={ignore_index} "
                             f"(range {int(values.min())}..{int(values.max())}).")
    image = torch.arange(n, device=masks.device).unsqueeze(1).expand_as(masks)[valid]
    index = (image * num_classes + labels) * num_classes + predicted
    return torch.bincount(index, minlength=n * num_classes * num_classes).view(n, num_classes, num_classes)


def per_image_confusion(network: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        num_classes: int | None = None, ignore_index: int | None = 255) -> torch.Tensor:
    """``network``'s per-image confusion matrices on ``batches`` of ``(images, masks)`` (eval mode, no gradients,
    logits resized to the masks as :func:`~.metrics.miou_evaluator` does): ``[num_images, C, C]`` int64 on the
    CPU, images in batch order. ``num_classes`` defaults to the logits' channels."""
    matrices = [confusion_matrices(logits.argmax(1), masks, logits.shape[1] if num_classes is None else num_classes,
                                   ignore_index).cpu()
                for logits, masks in logits_at_masks(network, batches)]
    if not matrices:
        raise ValueError("no batches: per-image confusion matrices need validation batches with labels.")
    return torch.cat(matrices)


def _as_array(confusion, name: str = "confusion") -> np.ndarray:
    array = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    if array.ndim not in (2, 3) or array.shape[-1] != array.shape[-2]:
        raise ValueError(f"{name} must be a [C, C] confusion matrix or a [N, C, C] stack, got shape {array.shape}.")
    return array.astype(np.float64)


def _iou(confusion: np.ndarray) -> np.ndarray:
    """IoU per class of ``[..., C, C]`` matrices; NaN where a class is in neither ground truth nor prediction."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def _miou(confusion: np.ndarray, ignore_index: int | None) -> np.ndarray:
    iou = _iou(confusion)
    if ignore_index is not None and 0 <= ignore_index < iou.shape[-1]:  # torchmetrics drops that class too
        iou[..., ignore_index] = np.nan
    present = ~np.isnan(iou)
    counts = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.where(present, iou, 0.0).sum(-1) / np.maximum(counts, 1), np.nan)


def per_class_iou(confusion) -> np.ndarray:
    """IoU of every class (float64 ``[C]``) from a ``[C, C]`` confusion matrix or the sum of a ``[N, C, C]``
    stack; NaN for a class absent from both ground truth and prediction."""
    array = _as_array(confusion)
    return _iou(array.sum(0) if array.ndim == 3 else array)


def miou_from_confusion(confusion, ignore_index: int | None = None) -> float:
    """Dataset-level mIoU (0..1) of a ``[C, C]`` matrix or the sum of a ``[N, C, C]`` stack: mean IoU over the
    classes present in ground truth or prediction (class ``ignore_index``, if it is a class id, left out), as
    torchmetrics computes it; NaN when no class is present."""
    array = _as_array(confusion)
    return float(_miou(array.sum(0) if array.ndim == 3 else array, ignore_index))


# ---- paired bootstrap over images ---------------------------------------------------------------------------------


def difference_verdict(low: float, high: float) -> str:
    """``"no measurable difference"`` if ``[low, high]`` covers 0, else ``"better"`` (above 0) or ``"worse"``."""
    if low <= 0 <= high:
        return NO_DIFFERENCE
    return "better" if low > 0 else "worse"


def _check_level(level: float) -> float:
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0 < level < 1:
        raise ValueError(f"level must be a confidence level strictly between 0 and 1 (e.g. 0.95), got {level!r}.")
    return float(level)


@dataclass(frozen=True)
class BootstrapResult:
    """mIoU(b) - mIoU(a) in points (x100) on the full set, its percentile interval and the verdict."""

    estimate: float
    low: float
    high: float
    verdict: str
    level: float
    resamples: int
    images: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(conf_a, conf_b, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                     ignore_index: int | None = None) -> BootstrapResult:
    """Paired bootstrap over validation images of mIoU(b) - mIoU(a), in points (x100).

    ``conf_a`` and ``conf_b`` are the per-image confusion matrices ``[N, C, C]`` of two networks on the same
    images in the same order. Each of ``resamples`` resamples draws N image indices with replacement — the same
    indices for both networks — and takes the difference of the dataset-level mIoUs of the summed matrices.
    The estimate is the difference on the full set; ``low``/``high`` are the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` percentiles of the resampled differences (numpy's linear interpolation). The verdict is
    ``"better"`` when the interval lies above 0 (b has the higher mIoU), ``"worse"`` below 0, else
    ``"no measurable difference"``. Deterministic for a given ``seed``. The interval reflects which images
    were sampled for validation, not training noise (use :func:`paired_seed_difference` over seeds for that).
    """
    a, b = _as_array(conf_a, "conf_a"), _as_array(conf_b, "conf_b")
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"paired_bootstrap needs per-image confusion matrices [N, C, C], got shapes {a.shape} and "
                         f"{b.shape}.")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"conf_a has {a.shape[0]} images and conf_b {b.shape[0]}: a paired bootstrap needs both "
                         "networks scored on the same validation images, in the same order.")
    if a.shape != b.shape:
        raise ValueError(f"conf_a and conf_b have different numbers of classes: {a.shape} vs {b.shape}.")
    if a.shape[0] < 2:
        raise ValueError(f"paired_bootstrap needs at least 2 images, got {a.shape[0]}.")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}.")
    level = _check_level(level)
    n, c = a.shape[0], a.shape[1]
    estimate = 100.0 * float(_miou(b.sum(0), ignore_index) - _miou(a.sum(0), ignore_index))
    if math.isnan(estimate):
        raise ValueError("no class is present in the confusion matrices (every pixel ignored?).")
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, 256):  # bounded memory: 256 x N weights at a time
        count = min(256, resamples - start)
        drawn = rng.integers(0, n, size=(count, n))
        weights = np.zeros((count, n))
        np.add.at(weights, (np.repeat(np.arange(count), n), drawn.ravel()), 1.0)
        sum_a = (weights @ a.reshape(n, c * c)).reshape(count, c, c)  # exact: integer counts below 2**53
        sum_b = (weights @ b.reshape(n, c * c)).reshape(count, c, c)
        differences.append(100.0 * (_miou(sum_b, ignore_index) - _miou(sum_a, ignore_index)))
    differences = np.concatenate(differences)
    differences = differences[np.isfinite(differences)]  # a resample of only fully-ignored images has no mIoU
    low, high = (float(q) for q in np.quantile(differences, [(1 - level) / 2, (1 + level) / 2]))
    return BootstrapResult(estimate=estimate, low=low, high=high, verdict=difference_verdict(low, high),
                           level=level, resamples=int(resamples), images=n, seed=seed)


# ---- intervals over seeds -------------------------------------------------------------------------------------------

# two-sided Student-t quantiles t((1 + level) / 2, df) for df = 1..30, used only where scipy is missing
_T_TABLE = {
    0.90: (6.3138, 2.9200, 2.3534, 2.1318, 2.0150, 1.9432, 1.8946, 1.8595, 1.8331, 1.8125, 1.7959, 1.7823, 1.7709,
           1.7613, 1.7531, 1.7459, 1.7396, 1.7341, 1.7291, 1.7247, 1.7207, 1.7171, 1.7139, 1.7109, 1.7081, 1.7056,
           1.7033, 1.7011, 1.6991, 1.6973),
    0.95: (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
           2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
           2.0518, 2.0484, 2.0452, 2.0423),
    0.99: (63.6567, 9.9248, 5.8409, 4.6041, 4.0321, 3.7074, 3.4995, 3.3554, 3.2498, 3.1693, 3.1058, 3.0545, 3.0123,
           2.9768, 2.9467, 2.9208, 2.8982, 2.8784, 2.8609, 2.8453, 2.8314, 2.8188, 2.8073, 2.7969, 2.7874, 2.7787,
           2.7707, 2.7633, 2.7564, 2.7500),
}


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student-t critical value ``t((1 + level) / 2, df)`` (e.g. 4.303 for level 0.95, df 2).

    scipy where installed; otherwise a 4-decimal table for levels 0.90 / 0.95 / 0.99 and df <= 30, and for
    df > 30 the Cornish-Fisher expansion around the normal quantile (error < 1e-4 there). Other levels with
    df <= 30 need scipy."""
    level = _check_level(level)
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}.")
    try:
        from scipy import stats
    except ImportError:
        return _t_quantile_without_scipy(level, df)
    return float(stats.t.ppf((1 + level) / 2, df))


def _t_quantile_without_scipy(level: float, df: int) -> float:
    if df <= 30:
        for tabled, values in _T_TABLE.items():
            if math.isclose(level, tabled):
                return values[df - 1]
        raise RuntimeError(f"a Student-t quantile for level {level} with {df} degrees of freedom needs scipy "
                           f"(pip install scipy); without it levels {sorted(_T_TABLE)} are supported.")
    from statistics import NormalDist

    z, v = NormalDist().inv_cdf((1 + level) / 2), float(df)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * v ** 4))


@dataclass(frozen=True)
class MeanCI:
    """A mean over ``n`` values and its Student-t interval; ``low``/``high`` are None for a single value (no
    spread to estimate, so no interval)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def verdict(self) -> str | None:
        """For a difference (:func:`paired_seed_difference`): see :func:`difference_verdict`; None without an
        interval."""
        return None if self.low is None else difference_verdict(self.low, self.high)

    def as_dict(self) -> dict:
        return {**asdict(self), "half_width": self.half_width, "verdict": self.verdict}


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean of ``values`` (e.g. one number per seed) with the Student-t interval ``mean +- t * s / sqrt(n)``
    (``s``: sample standard deviation, ``n - 1`` degrees of freedom). With one value the interval is None: one
    run says nothing about run-to-run spread."""
    level = _check_level(level)
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_ci needs a non-empty list of numbers, got {values!r}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"mean_ci got a non-finite value: {values!r}.")
    mean, n = float(array.mean()), int(array.size)
    if n == 1:
        return MeanCI(mean=mean, low=None, high=None, n=1, level=level)
    half = t_quantile(level, n - 1) * float(array.std(ddof=1)) / math.sqrt(n)
    return MeanCI(mean=mean, low=mean - half, high=mean + half, n=n, level=level)


def paired_seed_difference(a_values: Sequence[float], b_values: Sequence[float], level: float = 0.95) -> MeanCI:
    """:func:`mean_ci` of the per-seed differences ``b - a`` (``a_values[i]`` and ``b_values[i]`` from the same
    seed); its ``verdict`` says whether b is measurably better or worse than a."""
    a, b = list(a_values), list(b_values)
    if len(a) != len(b):
        raise ValueError(f"paired_seed_difference needs one value per seed on both sides, got {len(a)} and "
                         f"{len(b)}.")
    return mean_ci([y - x for x, y in zip(a, b)], level)
