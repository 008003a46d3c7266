"""Scores by polyp size and brightness: every image in one bin, means and intervals per bin."""

import math

import numpy as np
import pytest

from polypseg.metrics.strata import (
    BRIGHTNESS_BINS,
    POLYP_SIZE_BINS,
    mean_luma,
    polyp_fraction,
    scores_by_stratum,
    strata_markdown,
)


def test_polyp_fraction_and_luma_of_hand_made_arrays():
    mask = np.zeros((10, 10), np.uint8)
    mask[:2, :5] = 255
    assert polyp_fraction(mask) == pytest.approx(0.10)
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = 100  # pure red: luma 0.299 * 100
    assert mean_luma(image) == pytest.approx(29.9)


def test_scores_are_grouped_by_bin_with_means_counts_and_intervals():
    dice = [0.2, 0.4, 0.9, 0.8, 0.7]
    fractions = [0.005, 0.02, 0.05, 0.5, 0.3]
    small, medium, large, huge = scores_by_stratum(dice, fractions, POLYP_SIZE_BINS)
    assert (small.images, small.mean) == (2, pytest.approx(0.3))
    assert (medium.images, medium.mean) == (1, pytest.approx(0.9))
    assert math.isnan(medium.ci95_low)  # one image has no interval
    assert large.images == 0 and math.isnan(large.mean)
    assert huge.images == 2 and huge.ci95_low <= huge.mean <= huge.ci95_high
    assert sum(s.images for s in (small, medium, large, huge)) == len(dice)


def test_bin_edges_belong_to_the_upper_bin_and_the_extremes_fit():
    strata = scores_by_stratum([1.0, 0.5, 0.0, 0.25], [0.0, 90.0, 255.0, 110.0], BRIGHTNESS_BINS)
    assert [s.images for s in strata] == [1, 1, 2]
    assert scores_by_stratum([1.0], [1.0], POLYP_SIZE_BINS)[-1].images == 1  # a mask that is all polyp


def test_a_measure_outside_every_bin_or_a_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="falls in 0 bins"):
        scores_by_stratum([0.5], [-1.0], POLYP_SIZE_BINS)
    with pytest.raises(ValueError, match="2 scores but 1 measures"):
        scores_by_stratum([0.5, 0.6], [0.1], POLYP_SIZE_BINS)


def test_markdown_shows_every_stratum_and_na_for_empty_ones():
    table = strata_markdown(scores_by_stratum([0.9, 0.7], [0.05, 0.06], POLYP_SIZE_BINS))
    assert table.count("\n") == 2 + len(POLYP_SIZE_BINS)
    assert "| polyp 3-10% | 2 | 0.8000 |" in table and "| polyp over 25% | 0 | n/a | n/a |" in table
