import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_segcompress.utils import statistics
from lightning_segcompress.utils.metrics import miou_evaluator
from lightning_segcompress.utils.statistics import (
    NO_DIFFERENCE,
    confusion_matrices,
    mean_ci,
    miou_from_confusion,
    paired_bootstrap,
    paired_seed_difference,
    per_class_iou,
    per_image_confusion,
)
from support.common import REPO


def shift_case(images=10, wrong=5):
    """Two classes, 4 pixels per image (mask [0, 0, 1, 1]); b is right everywhere, a gets every pixel of the
    first ``wrong`` images wrong. mIoU(a) = 1/3 on the full set (tp = fp = fn = 10 per class), mIoU(b) = 1."""
    masks = torch.tensor([0, 0, 1, 1]).view(1, 1, 4).repeat(images, 1, 1)
    a = masks.clone()
    a[:wrong] = 1 - a[:wrong]
    return confusion_matrices(a, masks, 2), confusion_matrices(masks.clone(), masks, 2)


def test_confusion_matrices_count_pixels_per_image_and_leave_out_ignored_ones():
    masks = torch.tensor([[[0, 1], [255, 2]], [[2, 2], [1, 255]]])
    predictions = torch.tensor([[[0, 2], [1, 2]], [[2, 0], [1, 1]]])
    conf = confusion_matrices(predictions, masks, 3)
    assert conf.shape == (2, 3, 3) and conf.dtype == torch.int64
    assert conf[0].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]  # rows: truth, columns: prediction
    assert conf[1].tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]
    iou = per_class_iou(conf)
    assert iou.tolist() == pytest.approx([1 / 2, 1 / 2, 2 / 4])  # summed: [[1, 0, 0], [0, 1, 1], [1, 0, 2]]
    assert miou_from_confusion(conf) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrices(predictions, masks.clamp(max=3), 3)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    masks = torch.zeros(1, 2, 2, dtype=torch.long)
    conf = confusion_matrices(masks, masks, 3)
    assert per_class_iou(conf)[0] == 1 and np.isnan(per_class_iou(conf)[1:]).all()
    assert miou_from_confusion(conf) == 1.0


def test_full_set_miou_matches_the_projects_torchmetrics_evaluator():
    torch.manual_seed(0)
    network = nn.Conv2d(3, 5, 3, padding=1)
    batches = []
    for _ in range(3):
        masks = torch.randint(0, 5, (2, 12, 12))
        masks[:, :2] = 255
        masks[masks == 4] = 3  # class 4 only in predictions (fp), never in ground truth
        batches.append((torch.randn(2, 3, 12, 12), masks))
    conf = per_image_confusion(network, batches)
    assert conf.shape == (6, 5, 5) and int(conf.sum()) == 6 * 10 * 12
    assert miou_from_confusion(conf, ignore_index=255) == pytest.approx(miou_evaluator(batches, 5)(network),
                                                                       abs=1e-6)
    # a subset's mIoU is the mIoU of its summed matrices
    assert miou_from_confusion(conf[:2]) == pytest.approx(miou_evaluator(batches[:1], 5)(network), abs=1e-6)


def test_identical_predictions_give_zero_and_no_measurable_difference():
    conf, _ = shift_case()
    result = paired_bootstrap(conf, conf.clone(), resamples=200)
    assert (result.estimate, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.verdict == NO_DIFFERENCE and result.images == 10


def test_known_shift_is_exact_and_better_or_worse_by_sign():
    a, b = shift_case()
    result = paired_bootstrap(a, b, resamples=500, seed=1)
    assert result.estimate == pytest.approx(100 * (1 - 1 / 3))
    # a resample with k of its 10 images from the right half has mIoU(a) = k / (20 - k), so the difference is
    # 100 * (1 - k / (20 - k)), falling with k ~ Binomial(10, 1/2): P(k >= 9) = 1.1 % < 2.5 % < P(k >= 8) = 5.5 %
    # puts the 2.5 % percentile between k = 9 and k = 8, the 97.5 % one between k = 2 and k = 1
    difference = lambda k: 100 * (1 - k / (20 - k))  # noqa: E731
    assert difference(9) <= result.low <= difference(8) and difference(2) <= result.high <= difference(1)
    assert result.verdict == "better"
    reverse = paired_bootstrap(b, a, resamples=500, seed=1)
    assert reverse.estimate == pytest.approx(-result.estimate)
    assert (reverse.low, reverse.high) == pytest.approx((-result.high, -result.low))
    assert reverse.verdict == "worse"


def test_bootstrap_is_deterministic_per_seed():
    torch.manual_seed(0)
    masks = torch.randint(0, 3, (8, 6, 6))
    a = confusion_matrices(torch.randint(0, 3, (8, 6, 6)), masks, 3)
    b = confusion_matrices(torch.randint(0, 3, (8, 6, 6)), masks, 3)
    first = paired_bootstrap(a, b, resamples=300, seed=3)
    assert paired_bootstrap(a, b, resamples=300, seed=3) == first
    assert paired_bootstrap(a.numpy(), b.numpy(), resamples=300, seed=3) == first
    assert paired_bootstrap(a, b, resamples=300, seed=4) != first


@pytest.mark.parametrize("kwargs, message", [
    ({"conf_b": "fewer images"}, "same validation images"), ({"level": 1.0}, "between 0 and 1"),
    ({"level": 0}, "between 0 and 1"), ({"resamples": 0}, "resamples"), ({"conf_b": "no stack"}, r"\[N, C, C\]"),
])
def test_bad_bootstrap_inputs_raise_clear_errors(kwargs, message):
    a, b = shift_case()
    args = {"conf_a": a, "conf_b": b, **kwargs}
    if args["conf_b"] == "fewer images":
        args["conf_b"] = b[:7]
    elif args["conf_b"] == "no stack":
        args["conf_b"] = b.sum(0)
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(**args)


def test_mean_ci_against_a_hand_value():
    ci = mean_ci([1, 2, 3])
    half = 4.302652729911275 * 1 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n), s = 1
    assert ci.mean == 2 and ci.n == 3
    assert (ci.low, ci.high) == pytest.approx((2 - half, 2 + half), abs=1e-9)
    assert ci.half_width == pytest.approx(half)
    single = mean_ci([0.7])
    assert single.mean == 0.7 and single.low is None and single.high is None and single.verdict is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        mean_ci([1, 2], level=95)
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])


def test_paired_seed_difference_is_b_minus_a():
    diff = paired_seed_difference([0.50, 0.52, 0.51], [0.55, 0.56, 0.57])  # differences 0.05, 0.04, 0.06
    assert diff.mean == pytest.approx(0.05) and diff.low > 0 and diff.verdict == "better"
    assert paired_seed_difference([1, 2, 3], [1, 2, 3]).verdict == NO_DIFFERENCE
    with pytest.raises(ValueError, match="one value per seed"):
        paired_seed_difference([1, 2], [1, 2, 3])


def test_t_quantiles_without_scipy_match_scipy():
    from scipy import stats

    for df in (1, 2, 4, 9, 30, 31, 60, 500):
        for level in (0.90, 0.95, 0.99):
            exact = stats.t.ppf((1 + level) / 2, df)
            assert statistics._t_quantile_without_scipy(level, df) == pytest.approx(exact, abs=1e-4)
    with pytest.raises(RuntimeError, match="scipy"):
        statistics._t_quantile_without_scipy(0.8, 5)


def _benchmark_stats():
    import importlib.util

    path = REPO / "benchmarks" / "_stats.py"
    spec = importlib.util.spec_from_file_location("benchmarks_stats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_helpers_format_intervals_and_difference_rows():
    stats = _benchmark_stats()
    half = 4.302652729911275 / math.sqrt(3)
    assert stats.mean_with_ci([1, 2, 3]) == f"2.00 [{2 - half:.2f}, {2 + half:.2f}]" == "2.00 [-0.48, 4.48]"
    assert stats.mean_with_ci([0.5]) == "0.50 (n=1, no interval)"
    row = stats.difference_row([0.50, 0.52, 0.51], [0.55, 0.56, 0.57], scale=100)  # +5, +4, +6 points
    assert row["mean"] == pytest.approx(5.0) and row["n"] == 3 and row["verdict"] == "better"
    assert row["text"].startswith("+5.00 [+") and row["low"] > 0
    assert stats.difference_row([10.0, 11.0, 12.0], [8.0, 8.5, 10.0], higher_is_better=False)["verdict"] == "better"
    assert stats.difference_row([1.0], [2.0])["verdict"] == "n=1: no interval"
    assert stats.difference_row([1, 2, 3], [1, 2, 3])["verdict"] == NO_DIFFERENCE
