"""Explanation metrics against hand-computed values on tiny arrays and hand-made models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from polypseg.explain.metrics import (
    ExplainMetricsError,
    PredictedMaskProbability,
    deletion_insertion_auc,
    energy_inside,
    evaluate_explanations,
    explanation_report,
    gaussian_blur,
    pointing_game,
    salience_ranks,
    topk_iou,
)


def _box(size: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Ground-truth metrics


def test_energy_inside_hand_values() -> None:
    gt = _box(6, 1, 1, 2, 2)
    inside = np.where(gt, 0.7, 0.0)
    outside = np.where(gt, 0.0, 0.3)
    mixed = np.where(gt, 3.0, 0.0)
    mixed[5, 5] = 1.0  # mass 12 inside, 1 outside
    assert energy_inside(inside, gt) == pytest.approx(1.0)
    assert energy_inside(outside, gt) == pytest.approx(0.0)
    assert energy_inside(mixed, gt) == pytest.approx(12 / 13)
    assert math.isnan(energy_inside(mixed, np.zeros_like(gt)))  # no polyp
    assert math.isnan(energy_inside(np.zeros((6, 6)), gt))  # no explanation
    batch = energy_inside(np.stack([inside, outside, mixed]), np.stack([gt, gt, gt]))
    assert isinstance(batch, np.ndarray) and batch.shape == (3,)
    np.testing.assert_allclose(batch, [1.0, 0.0, 12 / 13])
    assert energy_inside(torch.from_numpy(mixed), torch.from_numpy(gt)) == pytest.approx(12 / 13)


def test_pointing_game_hand_values() -> None:
    gt = _box(10, 2, 2, 3, 3)
    heat = np.full((10, 10), 0.1)
    heat[3, 3] = 1.0
    assert pointing_game(heat, gt) == 1.0
    heat_out = np.full((10, 10), 0.1)
    heat_out[2, 7] = 1.0  # two pixels right of the box's last column (4)
    assert pointing_game(heat_out, gt) == 0.0
    assert pointing_game(heat_out, gt, tolerance=1) == 0.0
    assert pointing_game(heat_out, gt, tolerance=3) == 1.0
    plateau = np.zeros((10, 10))
    plateau[4, 4] = plateau[9, 9] = 1.0  # two equal maxima, one inside
    assert pointing_game(plateau, gt) == 1.0
    assert math.isnan(pointing_game(heat, np.zeros_like(gt)))
    assert math.isnan(pointing_game(np.zeros((10, 10)), gt))
    np.testing.assert_array_equal(pointing_game(np.stack([heat, heat_out]), np.stack([gt, gt])), [1.0, 0.0])


def test_topk_iou_hand_values() -> None:
    size = 10
    heat = np.arange(size * size, dtype=np.float64)[::-1].reshape(size, size)  # raster order = salience
    top15 = np.zeros(size * size, dtype=bool)
    top15[:15] = True
    gt = top15.reshape(size, size)
    assert topk_iou(heat, gt) == pytest.approx(1.0)  # default k = 15%
    assert topk_iou(heat, gt, k=0.30) == pytest.approx(15 / 30)
    assert topk_iou(heat, gt, k=0.10) == pytest.approx(10 / 15)
    assert topk_iou(heat, ~gt, k=0.15) == pytest.approx(0.0)
    assert math.isnan(topk_iou(heat, np.zeros_like(gt)))
    with pytest.raises(ExplainMetricsError, match="top-k"):
        topk_iou(heat, gt, k=0.0)
    with pytest.raises(ExplainMetricsError, match="must both be"):
        topk_iou(heat, gt[:5])


def test_salience_ranks_order_and_ties() -> None:
    heat = torch.tensor([[[0.2, 0.9], [0.5, 0.2]]])
    ranks = salience_ranks(heat)[0]
    assert sorted(ranks.tolist()) == [0, 1, 2, 3]
    assert ranks[1] == 0 and ranks[2] == 1 and {int(ranks[0]), int(ranks[3])} == {2, 3}
    flat = torch.zeros(1, 8, 8)
    first, second = salience_ranks(flat), salience_ranks(flat)
    assert torch.equal(first, second)  # ties broken the same way every time ...
    assert not torch.equal(first[0], torch.arange(64))  # ... but not in raster order


# ---------------------------------------------------------------------------------------------
# Deletion / insertion


class RegionProbabilityModel(nn.Module):
    """Foreground probability everywhere = 0.5 + 0.4 * mean of input channel 0 over ``region``.

    With inputs of 1 in channel 0 and a zero ("mean") baseline, the probability falls linearly
    from 0.9 to 0.5 as the region's pixels are removed.
    """

    def __init__(self, region: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = (x[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        probability = 0.5 + 0.4 * share
        return torch.logit(probability).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])


SIZE = 8
REGION = _box(SIZE, 0, 0, 4, 4)  # a = 1/4 of the pixels


def _auc(model: nn.Module, heat: np.ndarray, steps: int = 8, **kwargs: object) -> dict[str, np.ndarray]:
    images = torch.ones(1, 3, SIZE, SIZE)
    return deletion_insertion_auc(model, images, torch.from_numpy(heat)[None].float(), steps=steps, **kwargs)


def test_deletion_auc_of_a_linearly_falling_model() -> None:
    everywhere = np.ones((SIZE, SIZE), dtype=bool)
    model = RegionProbabilityModel(everywhere)
    heat = np.random.default_rng(0).random((SIZE, SIZE))
    result = _auc(model, heat, insertion_baseline="mean")
    # p(f) = 0.5 + 0.4 (1 - f), normalised by p(0) = 0.9: area = (0.5 + 0.2) / 0.9 whatever the order
    assert result["deletion_auc"][0] == pytest.approx(0.7 / 0.9, abs=1e-5)
    assert result["insertion_auc"][0] == pytest.approx(0.7 / 0.9, abs=1e-5)
    np.testing.assert_allclose(result["deletion_curve"][0], (0.5 + 0.4 * (1 - result["fractions"])) / 0.9, atol=1e-5)
    assert result["deletion_curve"].shape == (1, 9) and result["fractions"][-1] == 1.0


def test_deletion_rewards_the_heatmap_on_the_region_that_matters() -> None:
    model = RegionProbabilityModel(REGION)
    on_region = np.where(REGION, 1.0, 0.1)
    off_region = np.where(REGION, 0.1, 1.0)
    good = _auc(model, on_region, insertion_baseline="mean")
    bad = _auc(model, off_region, insertion_baseline="mean")
    a = 0.25
    # removing the region first: linear fall over [0, a], then flat at 0.5
    assert good["deletion_auc"][0] == pytest.approx((a * 0.7 + (1 - a) * 0.5) / 0.9, abs=1e-5)
    # removing it last: flat at 0.9 until 1 - a, then the same fall
    assert bad["deletion_auc"][0] == pytest.approx(((1 - a) * 0.9 + a * 0.7) / 0.9, abs=1e-5)
    assert good["insertion_auc"][0] == pytest.approx((a * 0.7 + (1 - a) * 0.9) / 0.9, abs=1e-5)
    assert bad["insertion_auc"][0] == pytest.approx(((1 - a) * 0.5 + a * 0.7) / 0.9, abs=1e-5)


def test_deletion_batched_equals_single_and_empty_prediction_is_nan() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)).eval()
    images = torch.randn(3, 3, SIZE, SIZE)
    heat = torch.rand(3, SIZE, SIZE)
    together = deletion_insertion_auc(model, images, heat, steps=4, batch_size=5)  # chunks cut across images
    for i in range(3):
        alone = deletion_insertion_auc(model, images[i], heat[i], steps=4, batch_size=64)
        np.testing.assert_allclose(together["deletion_curve"][i], alone["deletion_curve"], atol=1e-5)
        np.testing.assert_allclose(together["insertion_auc"][i], alone["insertion_auc"], atol=1e-5)
        assert np.ndim(alone["insertion_auc"]) == 0  # one image in, its values out
    never = nn.Sequential(nn.Conv2d(3, 1, 1))
    nn.init.zeros_(never[0].weight)
    nn.init.constant_(never[0].bias, -5.0)
    empty = deletion_insertion_auc(never, images, heat, steps=2)
    assert np.isnan(empty["deletion_auc"]).all() and np.isnan(empty["insertion_auc"]).all()
    with pytest.raises(ExplainMetricsError, match="steps"):
        deletion_insertion_auc(model, images, heat, steps=0)


def test_predicted_mask_probability_and_blur() -> None:
    reference = torch.tensor([[[[2.0, -2.0], [0.1, -0.1]]]])
    logits = torch.tensor([[[[0.0, 5.0], [0.0, 5.0]]]])
    score = PredictedMaskProbability(0.5)(logits, reference)
    assert score.item() == pytest.approx(0.5)  # mean of sigmoid(0) over the two predicted pixels
    constant = torch.full((1, 3, 12, 12), 0.7)
    assert torch.allclose(gaussian_blur(constant), constant, atol=1e-6)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(spike)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred.max() < 0.05


# ---------------------------------------------------------------------------------------------
# Reports


def test_explanation_report_leaves_out_nan() -> None:
    records = [
        {"stem": "a", "dice": 0.5, "pointing_game": 1.0},
        {"stem": "b", "dice": 0.7, "pointing_game": float("nan")},
        {"stem": "c", "dice": 0.9, "pointing_game": 0.0},
    ]
    report = explanation_report(records)
    assert [r["stem"] for r in report["per_image"]] == ["a", "b", "c"]
    assert report["mean_std"]["dice"] == pytest.approx({"mean": 0.7, "std": 0.2, "n": 3})
    assert report["mean_std"]["pointing_game"]["n"] == 2
    assert report["mean_std"]["pointing_game"]["mean"] == pytest.approx(0.5)
    assert "energy_inside" not in report["mean_std"]


@pytest.mark.slow
def test_evaluate_explanations_matches_the_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    from polypseg.data.transforms import images_to_tensor, normalize
    from polypseg.explain import metrics
    from polypseg.explain.gradcam import MaskedLogitSum, grad_cam
    from polypseg.models.factory import create_model

    torch.manual_seed(0)
    model = create_model(encoder="resnet18", decoder_channels=(8, 8, 8, 8, 8)).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 32), dtype=bool)
    masks[:, 8:20, 10:24] = True
    masks[2] = False  # an image without a polyp: its ground-truth metrics are NaN
    with torch.no_grad():
        logits = model(normalize(images_to_tensor(images)))
    threshold = float(torch.sigmoid(logits).median())  # a non-trivial predicted mask

    batches: list[int] = []
    real_logits = metrics.model_logits
    monkeypatch.setattr(metrics, "model_logits", lambda m, x, *a: batches.append(x.shape[0]) or real_logits(m, x, *a))
    report = evaluate_explanations(
        model,
        images,
        masks,
        threshold=threshold,
        batch_size=2,
        deletion_steps=2,
        stems=["x", "y", "z"],
        precision="fp32",
    )
    assert [r["stem"] for r in report["per_image"]] == ["x", "y", "z"]
    assert batches and max(batches) == 2  # batch_size bounds the deletion/insertion passes too
    heat = grad_cam(model, normalize(images_to_tensor(images)), MaskedLogitSum(threshold))
    expected_energy = energy_inside(heat, torch.from_numpy(masks))
    np.testing.assert_allclose([r["energy_inside"] for r in report["per_image"]], expected_energy, atol=1e-5)
    assert math.isnan(report["per_image"][2]["pointing_game"])
    assert report["mean_std"]["pointing_game"]["n"] == 2
    for record in report["per_image"]:
        assert set(record) >= {"dice", "energy_inside", "pointing_game", "topk_iou", "deletion_auc", "insertion_auc"}
        assert 0 <= record["dice"] <= 1 and np.isfinite(record["deletion_auc"])
    assert report["settings"]["deletion_steps"] == 2 and report["settings"]["layer"] == "decoder.final"
    with pytest.raises(ExplainMetricsError, match="masks"):
        evaluate_explanations(model, images, masks[:, :16])


def test_logits_from_another_engine_are_not_the_deletion_reference() -> None:
    """explain --engine: the curves' reference is rescored by the model that scores the perturbations."""
    from polypseg.explain.metrics import score_explanations
    from polypseg.inference.inferer import model_logits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    heat = torch.rand(2, SIZE, SIZE)
    own = model_logits(model, images, "fp32")
    elsewhere = own + 0.5  # another engine's slightly different logits
    kwargs = dict(deletion_steps=4, precision="fp32")
    same = score_explanations(model, images, heat, own, **kwargs)
    rescored = score_explanations(model, images, heat, elsewhere, logits_from_model=False, **kwargs)
    mixed = score_explanations(model, images, heat, elsewhere, **kwargs)
    for a, b in zip(same, rescored, strict=True):
        assert a["deletion_auc"] == pytest.approx(b["deletion_auc"]) and a["insertion_auc"] == pytest.approx(
            b["insertion_auc"]
        )
    assert any(a["deletion_auc"] != pytest.approx(c["deletion_auc"]) for a, c in zip(same, mixed, strict=True))
