from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from polypseg.metrics.boundary import boundary_f1, boundary_map, boundary_scores, default_tolerance


def square(size: int = 32, top: int = 8, left: int = 8, side: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def reference_boundary_f1(pred: np.ndarray, target: np.ndarray, tolerance: int) -> float:
    """Straightforward per-image version with scipy's Euclidean distance transform."""

    def contour(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1, mode="edge")
        eroded = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(2, 1))[1:-1, 1:-1]
        return mask & ~eroded

    pb, tb = contour(pred), contour(target)
    if not pb.any() and not tb.any():
        return float(pred.any() == target.any())
    if not pb.any() or not tb.any():
        return 0.0
    dist_to_t = ndimage.distance_transform_edt(~tb)
    dist_to_p = ndimage.distance_transform_edt(~pb)
    precision = (dist_to_t[pb] <= tolerance).mean()
    recall = (dist_to_p[tb] <= tolerance).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_map_is_the_inner_contour_and_ignores_the_frame_edge() -> None:
    mask = square(size=7, top=2, left=2, side=3)
    ring = boundary_map(mask)[0].numpy()
    expected = mask.copy()
    expected[3, 3] = False  # the centre pixel is interior
    assert np.array_equal(ring, expected)
    touching = np.zeros((6, 6), dtype=bool)
    touching[:, :3] = True  # left half of the frame
    edges = boundary_map(touching)[0].numpy()
    assert edges[:, 2].all() and not edges[:, :2].any()  # only the column facing the background


def test_identical_masks_score_one() -> None:
    mask = square()
    assert boundary_f1(mask, mask) == 1.0


def test_shift_within_tolerance_scores_one_and_beyond_it_less() -> None:
    mask = square()
    shifted = np.roll(mask, 1, axis=1)
    assert boundary_f1(shifted, mask, tolerance=2) == 1.0
    assert boundary_f1(shifted, mask, tolerance=0) < 1.0
    far = np.roll(mask, 5, axis=0)
    score = boundary_f1(far, mask, tolerance=2)
    assert 0.0 < score < 1.0


def test_disjoint_and_empty_cases() -> None:
    a = square(size=40, top=2, left=2, side=8)
    b = square(size=40, top=28, left=28, side=8)
    empty = np.zeros_like(a)
    full = np.ones_like(a)
    assert boundary_f1(a, b) == 0.0
    assert boundary_f1(empty, empty) == 1.0
    assert boundary_f1(a, empty) == 0.0 and boundary_f1(empty, a) == 0.0
    assert boundary_f1(full, full) == 1.0  # no contour at all, but the same (full) mask
    assert boundary_f1(full, empty) == 0.0


def test_batch_matches_a_distance_transform_reference() -> None:
    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.random((6, 48, 48)), sigma=(0, 4, 4))
    preds = blobs > 0.5
    targets = ndimage.gaussian_filter(rng.random((6, 48, 48)), sigma=(0, 4, 4)) > 0.5
    for tolerance in (0, 1, 2, 3):
        got = boundary_f1(torch.from_numpy(preds), torch.from_numpy(targets), tolerance)
        assert got.shape == (6,)
        expected = [reference_boundary_f1(p, t, tolerance) for p, t in zip(preds, targets, strict=False)]
        np.testing.assert_allclose(got, expected, atol=1e-12)


def test_precision_and_recall_are_asymmetric() -> None:
    big, small = square(side=16), square(top=12, left=12, side=4)
    scores = boundary_scores(small, big, tolerance=1)
    # the small square's contour lies far inside the big one's: nothing is matched either way
    assert scores["precision"][0] == 0.0 and scores["recall"][0] == 0.0
    inner = square(top=9, left=9, side=10)  # 1 px inside the 12-px square
    scores = boundary_scores(inner, square(), tolerance=1)
    assert scores["precision"][0] == 1.0 and scores["recall"][0] < 1.0


def test_shape_mismatch_and_tolerance_scaling() -> None:
    with pytest.raises(ValueError, match="shape"):
        boundary_f1(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 9), bool))
    assert default_tolerance(256) == 2
    assert default_tolerance(64) == 1
    assert default_tolerance(512) == 4
