"""Grad-CAM: known answers on hand-made models, targets, layers, hooks, and a cross-check with pytorch-grad-cam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polypseg.explain.gradcam import (
    ExplainError,
    GradCAMDriver,
    MaskedLogitSum,
    RegionLogitSum,
    SegmentationGradCAM,
    WholeLogitSum,
    available_layers,
    explain_images,
    grad_cam,
    resolve_layer,
)
from polypseg.models.factory import create_model

SIZE = 16


def _region(top: int, left: int, height: int, width: int, size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    return mask


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class RegionModel(nn.Module):
    """Features are the input itself; every output logit is the mean of channel 0 over ``region``.

    So only channel 0 inside ``region`` influences the output: its Grad-CAM channel weight is
    positive and every other channel's weight is exactly zero.
    """

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.decoder = _Decoder()
        self.register_buffer("region", region.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.decoder(x)
        score = (features[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        return score.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])


class PixelModel(nn.Module):
    """Per-pixel logit = features[0] + bias, features = input: a 1x1 'segmentation head'."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.decoder = _Decoder()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)[:, :1] + self.bias


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.manual_seed(0)
    model = create_model(encoder="resnet18", decoder_channels=(16, 16, 16, 16, 16)).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
        # centre the logits so the predicted mask at 0.5 covers about half of each image
        model.segmentation_head[0].bias -= logits.median()
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------------------
# Known answers


def test_heatmap_is_exactly_the_region_that_drives_the_logit() -> None:
    region = _region(2, 3, 5, 6)
    decoy = _region(9, 8, 4, 5)
    x = torch.zeros(1, 3, SIZE, SIZE)
    x[0, 0][region] = 1.0  # the channel the model reads, bright only in its region
    x[0, 1][decoy] = 5.0  # a brighter channel the model ignores
    heatmap = grad_cam(RegionModel(region), x, WholeLogitSum())
    assert torch.equal(heatmap[0], region.float())


def test_hirescam_localises_the_region_where_gradcam_cannot() -> None:
    region = _region(4, 4, 6, 3)
    model = RegionModel(region)
    x = torch.ones(1, 3, SIZE, SIZE)
    # Grad-CAM weights whole channels: a uniform input gives a uniform map ...
    assert torch.allclose(grad_cam(model, x, WholeLogitSum())[0], torch.ones(SIZE, SIZE))
    # ... HiResCAM keeps the gradient's position: exactly the region.
    assert torch.equal(grad_cam(model, x, WholeLogitSum(), method="hirescam")[0], region.float())


def test_masked_target_weights_the_channel_by_the_predicted_area() -> None:
    # logit = x0 - 0.5; target = sum over {x0 >= 0.5} of logits; d target / d x0 = predicted mask.
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with SegmentationGradCAM(PixelModel(-0.5), method="hirescam") as cam:
        heatmap, logits = cam(x, MaskedLogitSum(0.5), return_logits=True)
    predicted = x[0, 0] >= 0.5
    expected = x[0, 0] * predicted
    assert torch.allclose(heatmap[0], expected / expected.max(), atol=1e-6)
    assert torch.allclose(logits, x[:, :1] - 0.5)


def test_empty_prediction_gives_all_zero_heatmap_without_nan() -> None:
    x = torch.rand(2, 3, SIZE, SIZE)
    heatmap = grad_cam(PixelModel(bias=-10.0), x, MaskedLogitSum(0.5))
    assert heatmap.shape == (2, SIZE, SIZE)
    assert not torch.isnan(heatmap).any()
    assert torch.count_nonzero(heatmap) == 0


def test_driver_batches_uint8_images_into_the_hand_checked_heatmap() -> None:
    """The driver normalises uint8 images (ImageNet mean/std), batches them and explains each.

    The model reads channel 0 only, so Grad-CAM gives channel 0 a positive weight and channel 1
    none: each heatmap is exactly where that image's channel 0 is above the mean (255 there,
    normalised positive; 0 elsewhere, normalised negative and cut by the ReLU)."""
    regions = [_region(2, 3, 5, 6), _region(9, 8, 4, 5), _region(0, 0, 3, 3)]
    model = RegionModel(regions[0]).eval()
    images = np.zeros((3, SIZE, SIZE, 3), np.uint8)
    for image, region in zip(images, regions, strict=False):
        image[..., 0][region.numpy()] = 255
        image[..., 1] = 200  # bright everywhere, but the model ignores channel 1
    with GradCAMDriver(model, device="cpu", precision="fp32", batch_size=2) as driver:
        batches = list(driver.batches(images, WholeLogitSum()))
    assert [b.indices for b in batches] == [slice(0, 2), slice(2, 3)]
    heatmaps = torch.cat([b.heatmaps for b in batches])
    for heatmap, region in zip(heatmaps, regions, strict=False):
        assert torch.equal(heatmap, region.float())
    inside = (1 - 0.485) / 0.229
    logits = torch.cat([b.logits for b in batches])[:, 0, 0, 0]
    overlap = [(regions[0] & r).sum() / regions[0].sum() for r in regions]
    outside = -0.485 / 0.229
    expected = torch.tensor([o * inside + (1 - o) * outside for o in overlap], dtype=torch.float32)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert batches[0].inputs.shape == (2, 3, SIZE, SIZE) and batches[0].probabilities.shape == (2, SIZE, SIZE)


def test_driver_resizes_to_the_model_size_and_releases_hooks_when_the_loop_stops_early() -> None:
    model = PixelModel(-0.5).eval()
    layer = resolve_layer(model).module
    images = [np.full((20, 30, 3), 180, np.uint8), np.full((8, 8, 3), 180, np.uint8)]
    with GradCAMDriver(model, method="hirescam", image_size=SIZE, device="cpu", batch_size=1) as driver:
        assert len(layer._forward_hooks) == 1
        first = next(iter(driver.batches(images)))
    assert first.heatmaps.shape == (1, SIZE, SIZE) and first.indices == slice(0, 1)
    assert len(layer._forward_hooks) == 0


# ---------------------------------------------------------------------------------------------
# Targets


def test_targets_values_and_gradients() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-2.0, -2.0], [1.0, 4.0]]]], requires_grad=True)
    mask = torch.sigmoid(logits.detach()) >= 0.5
    masked = MaskedLogitSum(0.5)(logits)
    assert torch.allclose(masked, torch.tensor([2.5, 5.0]))
    (grad,) = torch.autograd.grad(masked.sum(), logits)
    assert torch.equal(grad, mask.float())  # the mask selects, it is not differentiated

    assert torch.allclose(WholeLogitSum()(logits), torch.tensor([-1.5, 1.0]))
    high = MaskedLogitSum(threshold=float(torch.sigmoid(torch.tensor(1.5))))(logits)
    assert torch.allclose(high, torch.tensor([2.0, 4.0]))

    region = torch.tensor([[True, False], [False, True]])
    assert torch.allclose(RegionLogitSum(region)(logits), torch.tensor([-1.0, 2.0]))
    per_image = np.array([[[True, True], [False, False]], [[False, False], [False, True]]])
    assert torch.allclose(RegionLogitSum(per_image)(logits), torch.tensor([1.0, 4.0]))
    with pytest.raises(ExplainError, match="does not fit"):
        RegionLogitSum(torch.ones(3, 3, dtype=torch.bool))(logits)


def test_region_target_explains_only_its_region() -> None:
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) + 0.1
    region = _region(0, 0, 4, 4)
    heatmap = grad_cam(PixelModel(), x, RegionLogitSum(region), method="hirescam")
    assert torch.count_nonzero(heatmap[0][~region]) == 0
    assert heatmap[0][region].min() > 0


# ---------------------------------------------------------------------------------------------
# Layers


def test_layer_names_resolve_to_the_expected_modules(unet: nn.Module) -> None:
    names = available_layers(unet)
    assert names[0] == "decoder.final"
    assert {"decoder.block0", "decoder.block4", "encoder.stage1", "encoder.stage4", "bottleneck"} <= set(names)
    assert resolve_layer(unet, "decoder.final").module is unet.decoder.blocks[-1]
    assert resolve_layer(unet, "decoder.block1").module is unet.decoder.blocks[1]
    assert resolve_layer(unet, "encoder.stage2").module is unet.encoder.layer2
    assert resolve_layer(unet, "bottleneck").module is unet.encoder.layer4
    assert resolve_layer(unet, "segmentation_head.0").module is unet.segmentation_head[0]
    assert resolve_layer(unet, unet.encoder.layer3).module is unet.encoder.layer3
    for name in names:
        resolve_layer(unet, name)
    with pytest.raises(ExplainError, match="decoder.block9"):
        resolve_layer(unet, "decoder.block9")
    with pytest.raises(ExplainError, match="no.such"):
        resolve_layer(unet, "no.such")
    with pytest.raises(ExplainError, match="not part of the model"):
        resolve_layer(unet, nn.Conv2d(1, 1, 1))


class _ListEncoder(nn.Module):
    """Like a non-ResNet smp encoder: returns ``[input, stride 2, stride 4]`` and has no ``layerK``."""

    out_channels = (3, 4, 4)

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.down1(x)
        return [x, a, self.down2(a)]


class _ListModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _ListEncoder()
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.head(self.encoder(x)[-1]), size=x.shape[-2:], mode="bilinear")


def test_encoder_stage_of_a_list_returning_encoder_matches_hooking_its_module() -> None:
    torch.manual_seed(5)
    model = _ListModel().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert "bottleneck" in available_layers(model)
    via_list = grad_cam(model, x, WholeLogitSum(), layer="bottleneck")
    via_module = grad_cam(model, x, WholeLogitSum(), layer="encoder.down2")
    assert torch.allclose(via_list, via_module, atol=1e-6)
    assert via_list.amax() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Hooks, grads, modes, shapes


def test_hooks_released_on_exit_on_error_and_by_release(unet: nn.Module, images: torch.Tensor) -> None:
    layer = unet.decoder.blocks[-1]
    with SegmentationGradCAM(unet) as cam:
        assert len(layer._forward_hooks) == 1
        cam(images[:1])
    assert len(layer._forward_hooks) == 0

    with pytest.raises(RuntimeError, match="boom"):
        with SegmentationGradCAM(unet):
            assert len(layer._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0

    with pytest.raises(ExplainError, match="one score per image"):
        with SegmentationGradCAM(unet) as cam:
            cam(images[:2], target=lambda logits: logits.sum())
    assert len(layer._forward_hooks) == 0

    cam = SegmentationGradCAM(unet, "encoder.stage1")
    assert len(unet.encoder.layer1._forward_hooks) == 1
    cam.release()
    cam.release()
    assert len(unet.encoder.layer1._forward_hooks) == 0
    with pytest.raises(ExplainError, match="released"):
        cam(images[:1])


def test_no_parameter_gradients_and_grad_mode_restored(unet: nn.Module, images: torch.Tensor) -> None:
    unet.zero_grad(set_to_none=True)
    with SegmentationGradCAM(unet) as cam:
        cam(images[:1])
        with torch.no_grad():
            under_no_grad = cam(images[:1])
            assert not torch.is_grad_enabled()
        with torch.inference_mode():
            under_inference = cam(images[:1])
            assert torch.is_inference_mode_enabled()
        assert torch.is_grad_enabled()
        # forward passes outside __call__ (e.g. deletion curves) are not intercepted
        with torch.no_grad():
            assert not unet(images[:1]).requires_grad
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.requires_grad for p in unet.parameters())
    assert under_no_grad.amax() == pytest.approx(1.0)
    assert torch.allclose(under_no_grad, under_inference)


def test_concurrent_instances_on_one_model_do_not_interfere(unet: nn.Module, images: torch.Tensor) -> None:
    from concurrent.futures import ThreadPoolExecutor

    expected = [grad_cam(unet, images[i : i + 1]) for i in range(2)]

    def work(i: int) -> list[torch.Tensor]:
        with SegmentationGradCAM(unet) as cam:
            return [cam(images[i : i + 1]) for _ in range(3)]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, range(2)))
    for i, maps in enumerate(results):
        for heatmap in maps:
            assert torch.allclose(heatmap, expected[i], atol=1e-5)


def test_shapes_range_and_logits(unet: nn.Module, images: torch.Tensor) -> None:
    for layer in ("decoder.final", "decoder.block2", "encoder.stage4", "bottleneck"):
        with SegmentationGradCAM(unet, layer) as cam:
            heatmaps, logits = cam(images, return_logits=True)
        assert heatmaps.shape == (2, 64, 64) and heatmaps.dtype == torch.float32
        assert not torch.isnan(heatmaps).any()
        assert heatmaps.min() >= 0 and heatmaps.max() <= 1
        peaks = heatmaps.reshape(2, -1).amax(1)
        assert all(p == pytest.approx(1.0) or p == 0 for p in peaks.tolist())
        with torch.no_grad():
            assert torch.allclose(logits, unet(images), atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_batch_equals_single_images(unet: nn.Module, images: torch.Tensor, method: str) -> None:
    with SegmentationGradCAM(unet, method=method) as cam:
        batched = cam(images)
        singles = torch.cat([cam(images[i : i + 1]) for i in range(len(images))])
    assert torch.allclose(batched, singles, atol=1e-5)


def test_unknown_method_is_a_user_error(unet: nn.Module) -> None:
    with pytest.raises(ExplainError, match="eigencam"):
        SegmentationGradCAM(unet, method="eigencam")
    assert len(unet.decoder.blocks[-1]._forward_hooks) == 0


def test_bf16_autocast_close_to_float32(unet: nn.Module, images: torch.Tensor) -> None:
    with SegmentationGradCAM(unet) as cam:
        reference, ref_logits = cam(images[:1], return_logits=True)
        # the predicted mask must be the same for the comparison: reuse the fp32 one as a region
        region = torch.sigmoid(ref_logits[:, 0]) >= 0.5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, logits = cam(images[:1], RegionLogitSum(region), return_logits=True)
    assert low.dtype == torch.float32 and logits.dtype == torch.float32
    correlation = torch.corrcoef(torch.stack([reference.flatten(), low.flatten()]))[0, 1]
    assert correlation > 0.95


# ---------------------------------------------------------------------------------------------
# Cross-check with pytorch-grad-cam


@pytest.mark.parametrize("layer", ["decoder.final", "decoder.block2"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "layercam", "scorecam"])
def test_matches_pytorch_grad_cam(unet: nn.Module, images: torch.Tensor, layer: str, method: str) -> None:
    library = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    classes = {
        "gradcam": library.GradCAM,
        "gradcam++": library.GradCAMPlusPlus,
        "hirescam": library.HiResCAM,
        "layercam": library.LayerCAM,
        "scorecam": library.ScoreCAM,
    }
    with SegmentationGradCAM(unet, layer, method) as cam:
        ours, logits = cam(images, MaskedLogitSum(0.5), return_logits=True)
    masks = (torch.sigmoid(logits[:, 0]) >= 0.5).float().numpy()
    assert 0.1 < masks.mean() < 0.9  # a real, non-trivial predicted mask
    with classes[method](model=unet, target_layers=[resolve_layer(unet, layer).module]) as reference:
        theirs = reference(input_tensor=images, targets=[SemanticSegmentationTarget(0, m) for m in masks])
    unet.zero_grad(set_to_none=True)  # the library calls .backward() on the parameters
    # pytorch-grad-cam min-max normalises (we divide by the max: a ReLU'd CAM has min 0 unless it
    # is positive everywhere) and, for decoder.block2 (16x16), resizes with cv2 bilinear, which
    # uses the same half-pixel centres as torch's align_corners=False. Min-max our maps the same
    # way; the rest must agree to float precision.
    flat = ours.reshape(len(ours), -1).numpy()
    low, high = flat.min(1)[:, None, None], flat.max(1)[:, None, None]
    ours_minmax = (ours.numpy() - low) / (high - low + 1e-7)
    assert ours_minmax.shape == theirs.shape
    np.testing.assert_allclose(ours_minmax, theirs, atol=1e-4)


class _MeanInside:
    """Mean logit inside a fixed mask, for our (N, 1, H, W) outputs and the library's (1, H, W) ones.

    Its scores are O(1), so Score-CAM's softmax over channels is far from one-hot (with the paper's
    sum over thousands of pixels it picks a single channel), and the weights themselves are compared.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        inside = output * self.mask
        return inside.reshape(-1, *output.shape[-2:]).sum((-2, -1)) / self.mask.sum()


@pytest.mark.slow
def test_scorecam_weights_match_pytorch_grad_cam(unet: nn.Module, images: torch.Tensor) -> None:
    library = pytest.importorskip("pytorch_grad_cam")
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    target = _MeanInside(mask)
    with SegmentationGradCAM(unet, "decoder.final", "scorecam", score_batch_size=5) as cam:
        ours = cam(images, target)
        activation: list[torch.Tensor] = []
        handle = resolve_layer(unet, "decoder.final").module.register_forward_hook(lambda m, i, o: activation.append(o))
        with torch.no_grad():
            unet(images)
        handle.remove()
    # the weights are soft: no channel takes most of them (so this compares more than an argmax)
    maps = F.interpolate(activation[0], size=(64, 64), mode="bilinear", align_corners=True)
    low = maps.amin((-2, -1), keepdim=True)
    maps = (maps - low) / (maps.amax((-2, -1), keepdim=True) - low + 1e-8)
    with torch.no_grad():
        scores = torch.stack([target(unet(images[i : i + 1] * maps[i].unsqueeze(1))) for i in range(len(images))])
    assert torch.softmax(scores, 1).max() < 0.5
    with library.ScoreCAM(model=unet, target_layers=[resolve_layer(unet, "decoder.final").module]) as reference:
        theirs = reference(input_tensor=images, targets=[target, target])
    flat = ours.reshape(len(ours), -1).numpy()
    low_, high_ = flat.min(1)[:, None, None], flat.max(1)[:, None, None]
    np.testing.assert_allclose((ours.numpy() - low_) / (high_ - low_ + 1e-7), theirs, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# explain_images


def test_explain_images_returns_maps_at_original_sizes(unet: nn.Module) -> None:
    from polypseg.data.transforms import preprocess, resize_probabilities

    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((40, 56), (64, 64), (90, 30))]
    heatmaps, probabilities = explain_images(unet, inputs, image_size=64, threshold=0.5, batch_size=2, precision="fp32")
    assert len(heatmaps) == len(probabilities) == 3
    for image, heatmap, prob in zip(inputs, heatmaps, probabilities, strict=False):
        assert heatmap.shape == prob.shape == image.shape[:2]
        assert heatmap.dtype == prob.dtype == np.float32
        assert 0 <= heatmap.min() and heatmap.max() == pytest.approx(1.0)
        with torch.no_grad():
            expected = resize_probabilities(torch.sigmoid(unet(preprocess(image, 64))), image.shape[:2])
        np.testing.assert_allclose(prob, expected[0, 0].numpy(), atol=1e-5)
    assert len(unet.decoder.blocks[-1]._forward_hooks) == 0
