"""Metrics against hand-computed values on tiny masks."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from polypseg.metrics.segmentation import (
    SegmentationMetrics,
    confusion,
    dice_score,
    iou_score,
    mean_std,
    roc_auc_exact,
    roc_auc_from_histograms,
)


def masks(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_confusion_counts_by_hand():
    pred = masks("1100", "0000")
    target = masks("1000", "1000")
    tp, fp, fn, tn = confusion(pred, target)
    assert (tp.item(), fp.item(), fn.item(), tn.item()) == (1, 1, 1, 5)


def test_dice_and_iou_by_hand():
    pred = masks("1100", "0000")
    target = masks("1000", "1000")
    # Dice = 2*1 / (2 + 2) = 0.5; IoU = 1 / 3
    assert dice_score(pred, target).item() == pytest.approx(0.5)
    assert iou_score(pred, target).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "pred, target, dice, iou",
    [
        (masks("00", "00"), masks("00", "00"), 1.0, 1.0),  # empty vs empty counts as perfect
        (masks("11", "11"), masks("11", "11"), 1.0, 1.0),  # all-positive, perfect
        (masks("10", "01"), masks("10", "01"), 1.0, 1.0),  # perfect
        (masks("10", "00"), masks("01", "00"), 0.0, 0.0),  # disjoint
        (masks("00", "00"), masks("01", "00"), 0.0, 0.0),  # missed polyp
        (masks("11", "00"), masks("00", "00"), 0.0, 0.0),  # false alarm on an empty image
        (masks("11", "11"), masks("10", "00"), 2 / 5, 1 / 4),  # all-positive prediction
    ],
)
def test_edge_cases(pred, target, dice, iou):
    assert dice_score(pred, target).item() == pytest.approx(dice)
    assert iou_score(pred, target).item() == pytest.approx(iou)


def test_batch_is_per_image_then_mean():
    pred = torch.stack([masks("11", "00"), masks("00", "00")])
    target = torch.stack([masks("11", "00"), masks("01", "00")])
    metric = SegmentationMetrics(thresholds=(0.5,))
    metric.update(pred.float(), target)
    result = metric.at_threshold(0.5)
    assert result["dice"] == pytest.approx((1.0 + 0.0) / 2)  # mean of per-image, not pooled (2*2/5)
    # pooled pixels: tp=2, fp=0, fn=1
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["precision"] == pytest.approx(1.0)


def test_accumulator_equals_single_update():
    torch.manual_seed(0)
    probs = torch.rand(6, 8, 8)
    target = torch.rand(6, 8, 8) > 0.5
    once = SegmentationMetrics()
    once.update(probs, target)
    chunked = SegmentationMetrics()
    chunked.update(probs[:2], target[:2])
    chunked.update(probs[2:], target[2:])
    assert once.compute() == chunked.compute()


def test_auc_matches_sklearn_on_binned_probabilities():
    torch.manual_seed(1)
    target = torch.rand(3, 16, 16) > 0.7
    probs = (torch.rand(3, 16, 16) * 0.6 + target * 0.3).clamp(0, 1)
    metric = SegmentationMetrics(bins=1000)
    metric.update(probs, target)
    binned = ((probs * 1000).long().clamp(max=999).float() + 0.5) / 1000
    expected = roc_auc_score(target.reshape(-1).numpy(), binned.reshape(-1).numpy())
    assert metric.auc() == pytest.approx(expected, abs=1e-12)


def test_exact_auc_by_hand_and_where_the_histogram_ties():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right
    assert roc_auc_exact(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc_exact(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)  # a tie counts one half
    assert np.isnan(roc_auc_exact(np.array([0.2, 0.9]), np.array([1, 1])))  # one class: undefined
    assert np.isnan(roc_auc_exact(np.array([np.nan, 0.9]), np.array([0, 1])))  # a diverged model: undefined
    # 0.0015 and 0.0011 share the first of 1000 bins: the histogram ties them, the exact AUC does not
    probs, target = torch.tensor([0.0011, 0.0015]), torch.tensor([0, 1])
    metric = SegmentationMetrics()
    metric.update(probs, target)
    assert metric.auc() == pytest.approx(0.5)
    assert roc_auc_exact(probs, target) == pytest.approx(1.0)


def test_auc_perfect_and_random():
    assert roc_auc_from_histograms(np.array([0, 0, 5]), np.array([5, 0, 0])) == pytest.approx(1.0)
    assert roc_auc_from_histograms(np.array([5, 0, 0]), np.array([0, 0, 5])) == pytest.approx(0.0)
    assert roc_auc_from_histograms(np.array([0, 4, 0]), np.array([0, 4, 0])) == pytest.approx(0.5)  # all ties


def test_best_threshold_picks_highest_dice():
    target = masks("1100", "0000")[None]
    probs = torch.tensor([[[0.62, 0.62, 0.58, 0.1], [0.1, 0.1, 0.1, 0.1]]])
    metric = SegmentationMetrics()
    metric.update(probs, target)
    # at 0.6 the prediction is exact; at <= 0.55 one false positive appears
    assert metric.best_threshold() == pytest.approx(0.6)
    assert metric.at_threshold(0.6)["dice"] == pytest.approx(1.0)


def test_best_threshold_ties_at_equal_distance_from_half_go_the_same_way():
    probs = torch.tensor([[[0.9, 0.0], [0.0, 0.0]]])  # Dice 1 at every candidate: all tie
    metric = SegmentationMetrics()
    metric.update(probs, probs > 0.5)
    assert metric.best_threshold() == 0.5
    # each pair is equally far from 0.5: the higher wins, whatever the floats of t - 0.5 say
    for low, high in [(0.45, 0.55), (0.4, 0.6), (0.35, 0.65), (0.3, 0.7)]:
        assert metric.best_threshold((low, high)) == high


def test_mean_std_uses_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert std == pytest.approx(1.0)


def test_mean_std_of_one_value_has_no_spread():
    mean, std = mean_std([0.8])
    assert mean == pytest.approx(0.8) and math.isnan(std)  # undefined, never reported as 0


def test_json_results_are_strict_json(tmp_path):
    import json

    from polypseg.core.io_utils import atomic_write_json

    atomic_write_json(
        tmp_path / "r.json", {"std": float("nan"), "values": [1.0, float("inf")], "arr": np.array([np.nan, 2.0])}
    )
    text = (tmp_path / "r.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(text, parse_constant=refuse) == {"arr": [None, 2.0], "std": None, "values": [1.0, None]}


def test_bootstrap_interval_of_the_mean():
    from polypseg.metrics.segmentation import bootstrap_ci

    assert bootstrap_ci([0.8] * 10) == (pytest.approx(0.8), pytest.approx(0.8))
    assert all(math.isnan(v) for v in bootstrap_ci([0.5]))
    values = np.random.default_rng(1).uniform(0.5, 1.0, 400)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    # the normal approximation: mean +- 1.96 standard errors
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert low == pytest.approx(values.mean() - 1.96 * se, abs=0.004)
    assert high == pytest.approx(values.mean() + 1.96 * se, abs=0.004)
    assert bootstrap_ci(values) == bootstrap_ci(values)  # seeded
    assert bootstrap_ci([0.0, 1.0, float("nan")]) != (float("nan"), float("nan"))  # NaN entries are dropped
