"""Predictor: inputs of any size and type, TTA, CV ensembles with uncertainty, Prediction fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from polypseg.data.images import ImageReadError
from polypseg.inference.predictor import Prediction, Predictor, PredictorError, overlay_mask
from polypseg.models.checkpoint import CheckpointError, save_checkpoint
from polypseg.models.factory import create_model

from helpers import tiny_config


def _save_tiny(path: Path, seed: int = 0, threshold: float = 0.4) -> Path:
    config = tiny_config(image_size=64)
    torch.manual_seed(seed)
    return save_checkpoint(path, create_model(config.model).eval(), config, threshold=threshold)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch", batch_size=2)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_outputs_have_each_input_size_for_arrays_pil_and_paths(predictor: Predictor, tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    Image.fromarray(_image(45, 33, seed=2)).save(path)
    inputs = [_image(50, 70), Image.fromarray(_image(37, 90, seed=1)), path, str(path)]
    results = predictor.predict(inputs)  # batch_size 2: also exercises a second batch
    assert [r.probability.shape for r in results] == [(50, 70), (37, 90), (45, 33), (45, 33)]
    assert predictor.threshold == pytest.approx(0.4)  # from the checkpoint
    for result in results:
        assert result.probability.dtype == np.float32
        assert 0 <= result.probability.min() and result.probability.max() <= 1
        assert np.array_equal(result.mask, result.probability >= 0.4)
        assert result.uncertainty is None
    assert results[2].source == str(path)
    np.testing.assert_array_equal(results[2].probability, results[3].probability)


def test_grayscale_rgba_and_16bit_are_converted(predictor: Predictor, tmp_path: Path) -> None:
    rgb = _image(40, 52, seed=3)
    gray = rgb[:, :, 0]
    reference_gray = predictor.predict_one(np.repeat(gray[:, :, None], 3, axis=2)).probability
    reference_rgb = predictor.predict_one(rgb).probability

    rgba = np.concatenate([rgb, np.full((40, 52, 1), 7, np.uint8)], axis=2)
    np.testing.assert_allclose(predictor.predict_one(rgba).probability, reference_rgb, atol=1e-6)
    np.testing.assert_allclose(predictor.predict_one(gray).probability, reference_gray, atol=1e-6)
    sixteen = gray.astype(np.uint16) * 257  # exact 8-bit values in 16-bit range
    np.testing.assert_allclose(predictor.predict_one(sixteen).probability, reference_gray, atol=1e-6)
    path = tmp_path / "sixteen.png"
    Image.fromarray(sixteen).save(path)  # 16-bit grayscale PNG
    np.testing.assert_allclose(predictor.predict_one(path).probability, reference_gray, atol=1e-6)
    np.testing.assert_allclose(predictor.predict_one(Image.open(path)).probability, reference_gray, atol=1e-6)
    np.testing.assert_allclose(predictor.predict_one(Image.fromarray(rgba)).probability, reference_rgb, atol=1e-6)
    # numpy arithmetic on 8-bit pixels gives int64: still 8-bit values, not a black 16-bit image
    np.testing.assert_allclose(predictor.predict_one(rgb.astype(np.int64)).probability, reference_rgb, atol=1e-6)
    wide = sixteen.astype(np.int32)  # PIL "I" mode: 16-bit data in int32
    np.testing.assert_allclose(predictor.predict_one(wide).probability, reference_gray, atol=1e-6)


def test_corrupt_file_is_named_and_skipped_with_on_error(predictor: Predictor, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_image(30, 30)).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    errors: list[tuple[str, Exception]] = []
    results = predictor.predict(
        [corrupt, good, tmp_path / "missing.png"], on_error=lambda name, e: errors.append((name, e))
    )
    assert [r.source for r in results] == [str(good)]
    assert [Path(name).name for name, _ in errors] == ["corrupt.jpg", "missing.png"]
    assert "corrupt.jpg" in str(errors[0][1])
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        predictor.predict([good, corrupt])


def test_prediction_fields_and_rethreshold() -> None:
    probability = np.array([[0.1, 0.6], [0.8, 0.45]], dtype=np.float32)
    prediction = Prediction(probability, threshold=0.5, source="x")
    assert prediction.area_pixels == 2
    assert prediction.area_fraction == pytest.approx(0.5)
    assert prediction.mean_confidence == pytest.approx(0.7)
    lower = prediction.with_threshold(0.4)
    assert lower.area_pixels == 3 and lower.threshold == 0.4
    assert lower.mean_confidence == pytest.approx((0.6 + 0.8 + 0.45) / 3)
    assert prediction.area_pixels == 2  # the original is unchanged
    empty = prediction.with_threshold(0.9)
    assert empty.area_pixels == 0 and empty.mean_confidence == 0.0


def test_predict_resized_and_predict_tensor_match_predict(predictor: Predictor) -> None:
    images = np.stack([_image(64, 64, seed=s) for s in range(3)])
    resized = predictor.predict_resized(images)
    assert resized.shape == (3, 64, 64) and resized.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(resized[i], predictor.predict_one(images[i]).probability, atol=1e-6)
    from polypseg.data.transforms import preprocess

    tensor = predictor.predict_tensor(preprocess(images, 64))
    assert tuple(tensor.shape) == (3, 1, 64, 64)
    np.testing.assert_allclose(tensor[:, 0].numpy(), resized, atol=1e-6)


class _PixelModel(nn.Module):
    """A 1x1 convolution: commutes with flips."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        nn.init.normal_(self.conv.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _RampModel(nn.Module):
    """Ignores its input: logits rise from left to right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-3, 3, x.shape[3]).view(1, 1, 1, -1)
        return ramp.expand(x.shape[0], 1, x.shape[2], x.shape[3]).clone()


def test_flip_tta_undoes_each_flip() -> None:
    torch.manual_seed(0)
    model = _PixelModel()
    image = _image(32, 32, seed=5)  # not symmetric: a missing flip-back would show
    plain = Predictor.from_model(model, image_size=32, device="cpu").predict_one(image).probability
    tta = Predictor.from_model(model, image_size=32, device="cpu", tta=True).predict_one(image).probability
    np.testing.assert_allclose(tta, plain, atol=1e-5)

    ramp = torch.sigmoid(torch.linspace(-3, 3, 32)).numpy()
    # vertical flip leaves a left-right ramp alone; the horizontal flip mirrors it
    expected = np.broadcast_to((2 * ramp + ramp[::-1]) / 3, (32, 32))
    tta_ramp = Predictor.from_model(_RampModel(), image_size=32, device="cpu", tta=True).predict_one(image).probability
    np.testing.assert_allclose(tta_ramp, expected, atol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_predictor_and_evaluation_share_one_core(tta: bool) -> None:
    """Predictor and evaluation.predict_probabilities run the same input, precision and TTA code:
    in fp32 on the CPU their probabilities are bit for bit the same."""
    from polypseg.training.evaluation import predict_probabilities

    config = tiny_config(image_size=32)
    torch.manual_seed(0)
    model = create_model(config.model).eval()
    images = np.stack([_image(32, 32, seed=s) for s in range(3)])
    predictor = Predictor.from_model(model, image_size=32, device="cpu", tta=tta, batch_size=2, precision="fp32")
    expected = predict_probabilities(model, images, batch_size=2, tta_flip=tta, precision="fp32").numpy()
    np.testing.assert_array_equal(predictor.predict_resized(images), expected)


def _fake_run(root: Path, seeds: tuple[int, int], threshold: float | None) -> Path:
    for fold, seed in enumerate(seeds):
        (root / f"fold_{fold}").mkdir(parents=True)
        _save_tiny(root / f"fold_{fold}" / "best", seed=seed, threshold=0.45)
    if threshold is not None:
        (root / "summary.json").write_text(json.dumps({"threshold": threshold, "folds": 2}))
    return root


def test_run_folder_ensemble_mean_and_uncertainty(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", (0, 1), threshold=0.35)
    ensemble = Predictor.from_checkpoint(run, device="cpu", backend="torch")
    assert ensemble.n_models == 2 and len(ensemble.models) == 2
    assert ensemble.threshold == pytest.approx(0.35)
    assert ensemble.metadata["summary"]["folds"] == 2 and len(ensemble.metadata["checkpoints"]) == 2
    image = _image(41, 57, seed=4)
    result = ensemble.predict_one(image)
    assert result.uncertainty is not None and result.uncertainty.shape == (41, 57)
    assert result.uncertainty.min() >= 0 and result.uncertainty.max() > 1e-4
    # At the model's input size nothing is resized: the std of two values is half their distance.
    square = _image(64, 64, seed=4)
    result = ensemble.predict_one(square)
    folds = [
        Predictor.from_checkpoint(run, device="cpu", backend="torch", fold=k).predict_one(square).probability
        for k in (0, 1)
    ]
    np.testing.assert_allclose(result.probability, (folds[0] + folds[1]) / 2, atol=1e-5)
    np.testing.assert_allclose(result.uncertainty, np.abs(folds[0] - folds[1]) / 2, atol=1e-5)
    with pytest.raises(PredictorError, match="--fold 5"):
        Predictor.from_checkpoint(run, device="cpu", backend="torch", fold=5)


def test_identical_folds_have_zero_uncertainty_and_fold_threshold(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", (3, 3), threshold=None)
    ensemble = Predictor.from_checkpoint(run, device="cpu", backend="torch")
    assert ensemble.threshold == pytest.approx(0.45)  # no summary.json: the folds' threshold
    assert Predictor.from_checkpoint(run, device="cpu", backend="torch", threshold=0.6).threshold == 0.6
    image = _image(30, 20, seed=6)
    result = ensemble.predict_one(image)
    assert np.abs(result.uncertainty).max() < 1e-6
    single = Predictor.from_checkpoint(run / "fold_0" / "best", device="cpu", backend="torch").predict_one(image)
    np.testing.assert_allclose(result.probability, single.probability, atol=1e-6)


def test_bad_model_path_and_options_are_user_errors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        Predictor.from_checkpoint(tmp_path / "nowhere")
    with pytest.raises(PredictorError, match="backend"):
        Predictor.from_checkpoint(tiny_checkpoint, backend="tensorrt")
    with pytest.raises(PredictorError, match="device"):
        Predictor.from_checkpoint(tiny_checkpoint, device="tpu")
    with pytest.raises(PredictorError, match="compile"):
        Predictor.from_checkpoint(tiny_checkpoint, backend="torch", compile="fastest")


def test_overlay_tints_only_the_mask() -> None:
    image = np.full((20, 20, 3), 100, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = overlay_mask(image, mask, color=(0, 255, 0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], image[~mask])
    assert (out[mask][:, 1] > 100).all() and (out[mask][:, 0] < 100).all()
    assert tuple(out[5, 10]) == (0, 255, 0)  # outline drawn opaque


def test_full_size_maps_in_stripes_match_the_whole_map_resize() -> None:
    from polypseg.data.transforms import resize_probabilities
    from polypseg.inference.predictor import (
        overlay_mask,
        overlay_mask_inplace,
        upsample_mask,
        upsample_rows,
        upsample_uint8,
    )

    rng = np.random.default_rng(0)
    small = rng.random((64, 64)).astype(np.float32)
    for size in ((50, 70), (333, 517), (64, 64), (1, 1)):
        whole = resize_probabilities(torch.from_numpy(small)[None, None], size)[0, 0].numpy()
        stripes = np.concatenate([rows for _, _, rows in upsample_rows(small, size, rows=37)])
        assert stripes.shape == whole.shape
        np.testing.assert_allclose(stripes, whole, atol=2e-5)
        mask, confidence = upsample_mask(small, size, 0.5, rows=41)
        assert np.mean(mask == (whole >= 0.5)) > 0.999
        assert confidence == pytest.approx(float(whole[whole >= 0.5].mean()) if (whole >= 0.5).any() else 0.0, abs=1e-4)
        assert np.abs(upsample_uint8(small, size).astype(int) - np.round(whole * 255)).max() <= 1
    image = rng.integers(0, 256, (300, 211, 3), dtype=np.uint8)
    mask = np.zeros((300, 211), bool)
    mask[40:250, 30:190] = True
    mask[120:125] = False
    np.testing.assert_array_equal(overlay_mask_inplace(image.copy(), mask, rows=50), overlay_mask(image, mask))


def test_predict_model_size_matches_predict() -> None:
    torch.manual_seed(0)
    predictor = Predictor.from_model([_PixelModel(), _PixelModel()], image_size=32, device="cpu")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    mean, std = predictor.predict_model_size(images)
    assert mean.shape == (2, 32, 32) and std is not None and std.shape == (2, 32, 32)
    full = predictor.predict(images)
    np.testing.assert_allclose(mean[1], full[1].probability, atol=1e-6)  # already at the model's size


def test_an_in_memory_model_is_given_its_input_size():
    """A module does not carry the side it was trained at: a default of 256 ran the 352 px shipped model,
    passed as ``load_checkpoint(...).model``, at 256 px without a word."""
    from polypseg.explain import explain_images

    with pytest.raises(TypeError, match="image_size"):
        Predictor.from_model(_PixelModel(), device="cpu")
    with pytest.raises(TypeError, match="image_size"):
        explain_images(_PixelModel(), [np.zeros((8, 8, 3), np.uint8)])
