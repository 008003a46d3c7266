"""Forward-only Grad-CAM (polypseg.explain.engine_gradcam): the closed-form head gradient against autograd,
the onnxruntime/OpenVINO engines against SegmentationGradCAM, and the refusals. Tiny CPU models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from polypseg.core.precision import cpu_bf16_flags
from polypseg.errors import PolypsegError
from polypseg.explain.engine_gradcam import (
    EngineGradCAM,
    EngineGradCAMError,
    LogitsAndHeadInput,
    check_layer_is_head_input,
    export_gradcam_onnx,
    gradcam_channel_weights,
    linear_head_conv,
    region_logit_gradient,
)
from polypseg.explain.gradcam import MaskedLogitSum, RegionLogitSum, SegmentationGradCAM, WholeLogitSum
from polypseg.models.factory import create_model

from helpers import block_import

SIZE = 64


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.manual_seed(0)
    model = create_model(encoder="resnet18", decoder_channels=(16, 16, 16, 16, 16)).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
        # centre the logits so the predicted mask at 0.5 covers about half of each image
        model.segmentation_head[0].bias -= logits.median()
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def exported(unet: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gradcam_onnx(unet, tmp_path_factory.mktemp("gradcam") / "tiny.onnx", image_size=SIZE)


@pytest.fixture(scope="module")
def ort_cam(unet: nn.Module, exported: Path) -> EngineGradCAM:
    return EngineGradCAM(
        unet, engine="onnxruntime", precision="fp32", image_size=SIZE, onnx_path=exported, export=False
    )


@pytest.fixture(scope="module")
def torch_reference(unet: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with SegmentationGradCAM(unet) as cam:
        return cam(images, return_logits=True)  # type: ignore[return-value]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# ---------------------------------------------------------------------------------------------
# The closed-form gradient


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_closed_form_gradient_equals_autograd(kernel: int) -> None:
    generator = torch.Generator().manual_seed(kernel)
    head = nn.Conv2d(7, 1, kernel, padding=kernel // 2)
    features = torch.randn(2, 7, 9, 11, generator=generator, requires_grad=True)
    region = (torch.rand(2, 1, 9, 11, generator=generator) > 0.4).float()
    region[0, 0, 0, :] = 1  # borders included: they are where the padding matters
    score = (head(features) * region).sum()
    (expected,) = torch.autograd.grad(score, features)

    gradient = region_logit_gradient(region, head.weight.detach())
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        gradcam_channel_weights(region, head.weight.detach()), expected.mean(dim=(2, 3)), rtol=1e-5, atol=1e-7
    )


def test_closed_form_gradient_of_the_paper_target_on_a_unet(unet: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        features = unet.decoder(unet.encoder(images))
    features.requires_grad_(True)
    logits = unet.segmentation_head(features)
    (expected,) = torch.autograd.grad(MaskedLogitSum(0.5)(logits).sum(), features)
    region = (torch.sigmoid(logits.detach()) >= 0.5).float()
    weight = linear_head_conv(unet).weight.detach()
    torch.testing.assert_close(region_logit_gradient(region, weight), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradcam_channel_weights(region, weight), expected.mean(dim=(2, 3)), rtol=1e-5, atol=1e-7)


def test_wrapper_returns_the_model_logits_and_the_head_input(unet: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        logits, features = LogitsAndHeadInput(unet)(images)
        torch.testing.assert_close(logits, unet(images))
        assert features.shape == (3, 16, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------
# Engines against SegmentationGradCAM


def test_onnxruntime_fp32_equals_segmentation_gradcam(
    ort_cam: EngineGradCAM, images: torch.Tensor, torch_reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    reference, reference_logits = torch_reference
    heatmaps, logits = ort_cam(images, return_logits=True)
    assert heatmaps.dtype == torch.float32 and heatmaps.shape == (3, SIZE, SIZE)
    assert logits.dtype == torch.float32 and logits.shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-4)
    # the same predicted masks, so the same target (no pixel sits on the threshold here)
    assert torch.equal(torch.sigmoid(logits) >= 0.5, torch.sigmoid(reference_logits) >= 0.5)
    torch.testing.assert_close(heatmaps, reference, rtol=0, atol=1e-4)
    assert float(heatmaps.amax(dim=(1, 2)).min()) == pytest.approx(1.0)


@pytest.mark.parametrize("target_name", ["region", "region_per_image", "whole", "threshold"])
def test_onnxruntime_fp32_equals_segmentation_gradcam_for_every_region_target(
    unet: nn.Module, ort_cam: EngineGradCAM, images: torch.Tensor, target_name: str
) -> None:
    square = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    square[10:30, 0:25] = True
    target = {
        "region": RegionLogitSum(square),
        "region_per_image": RegionLogitSum(torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) > 0.7),
        "whole": WholeLogitSum(),
        "threshold": MaskedLogitSum(0.3),
    }[target_name]
    with SegmentationGradCAM(unet) as cam:
        reference = cam(images, target)
    torch.testing.assert_close(ort_cam(images, target), reference, rtol=0, atol=1e-4)


def test_batch_of_one_and_numpy_input(ort_cam: EngineGradCAM, images: torch.Tensor) -> None:
    whole = ort_cam(images)
    single = ort_cam(images[1:2].numpy())
    torch.testing.assert_close(single, whole[1:2], rtol=0, atol=1e-5)


def test_empty_prediction_gives_all_zero_heatmap(ort_cam: EngineGradCAM, images: torch.Tensor) -> None:
    heatmaps = ort_cam(images, MaskedLogitSum(1.0 - 1e-7))
    assert torch.isfinite(heatmaps).all() and float(heatmaps.abs().max()) == 0.0


def test_openvino_fp32_equals_segmentation_gradcam(
    unet: nn.Module, exported: Path, images: torch.Tensor, torch_reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    pytest.importorskip("openvino")
    with EngineGradCAM(
        unet, engine="openvino", precision="fp32", image_size=SIZE, onnx_path=exported, export=False
    ) as cam:
        heatmaps = cam(images)
    torch.testing.assert_close(heatmaps, torch_reference[0], rtol=0, atol=1e-4)


@pytest.mark.skipif(not cpu_bf16_flags(), reason="this CPU has no native bf16 (amx_bf16/avx512_bf16)")
def test_openvino_bf16_correlates_with_fp32(
    unet: nn.Module, exported: Path, images: torch.Tensor, torch_reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    pytest.importorskip("openvino")
    with EngineGradCAM(
        unet, engine="openvino", precision="bf16", image_size=SIZE, onnx_path=exported, export=False
    ) as cam:
        assert cam.precision == "bf16"
        heatmaps = cam(images)
    for low, reference in zip(heatmaps, torch_reference[0], strict=False):
        assert _correlation(low, reference) >= 0.99


def test_onnxruntime_int8_correlates_with_fp32(
    unet: nn.Module,
    exported: Path,
    images: torch.Tensor,
    torch_reference: tuple[torch.Tensor, torch.Tensor],
    tmp_path: Path,
) -> None:
    calibration = [np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(8)]
    copy = tmp_path / "tiny.onnx"
    copy.write_bytes(exported.read_bytes())
    cam = EngineGradCAM(
        unet,
        engine="onnxruntime",
        precision="int8",
        image_size=SIZE,
        onnx_path=copy,
        export=False,
        calibration_images=calibration,
    )
    assert (tmp_path / "tiny.int8.onnx").is_file()
    heatmaps = cam(images)
    for low, reference in zip(heatmaps, torch_reference[0], strict=False):
        assert _correlation(low, reference) >= 0.95


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "head",
    [
        nn.Sequential(nn.Conv2d(16, 1, 3, padding=1), nn.Sigmoid()),
        nn.Sequential(nn.Conv2d(16, 1, 3, padding=1), nn.UpsamplingBilinear2d(scale_factor=2)),
        nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1)),
        nn.Sequential(nn.Conv2d(16, 1, 3, padding=0)),
        nn.Sequential(nn.Conv2d(16, 1, 3, padding=1, padding_mode="reflect")),
    ],
    ids=["sigmoid", "upsampling", "two-convs", "valid-padding", "reflect-padding"],
)
def test_refuses_a_head_that_is_not_one_plain_conv(unet: nn.Module, head: nn.Module) -> None:
    import copy

    model = copy.deepcopy(unet)  # the fixture is shared by the module: never change it in place
    model.segmentation_head = head
    with pytest.raises(EngineGradCAMError) as caught:
        EngineGradCAM(model, image_size=SIZE)
    assert isinstance(caught.value, PolypsegError) and "\n" not in str(caught.value)


@pytest.mark.parametrize("layer", ["decoder.block2", "encoder.stage4", "bottleneck"])
def test_refuses_a_layer_other_than_the_head_input(unet: nn.Module, layer: str) -> None:
    with pytest.raises(EngineGradCAMError, match="head's input"):
        EngineGradCAM(unet, image_size=SIZE, layer=layer)
    check_layer_is_head_input(unet, "decoder.final")  # the default is accepted
    check_layer_is_head_input(unet, unet.decoder.blocks[-1])


def test_refuses_other_methods_engines_precisions_and_targets(
    unet: nn.Module, ort_cam: EngineGradCAM, images: torch.Tensor
) -> None:
    with pytest.raises(EngineGradCAMError, match="gradcam"):
        EngineGradCAM(unet, image_size=SIZE, method="hirescam")
    with pytest.raises(EngineGradCAMError, match="engine"):
        EngineGradCAM(unet, image_size=SIZE, engine="tensorrt")
    with pytest.raises(EngineGradCAMError, match="bf16"):
        EngineGradCAM(unet, image_size=SIZE, engine="onnxruntime", precision="bf16")
    with pytest.raises(EngineGradCAMError, match="calibration_images"):
        EngineGradCAM(unet, image_size=SIZE, precision="int8", onnx_path=Path("/nonexistent.onnx"), export=False)
    with pytest.raises(EngineGradCAMError, match="targets"):
        ort_cam(images, lambda logits: logits.sum(dim=(1, 2, 3)))
    with pytest.raises(EngineGradCAMError, match="does not fit"):
        ort_cam(images, RegionLogitSum(torch.ones(SIZE, SIZE + 1, dtype=torch.bool)))
    with pytest.raises(EngineGradCAMError, match="exported for"):
        ort_cam(torch.zeros(1, 3, 2 * SIZE, 2 * SIZE))


def test_released_engine_refuses_calls(unet: nn.Module, exported: Path, images: torch.Tensor) -> None:
    cam = EngineGradCAM(unet, image_size=SIZE, onnx_path=exported, export=False)
    cam.release()
    with pytest.raises(EngineGradCAMError, match="released"):
        cam(images)


def test_the_openvino_engine_without_the_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    from polypseg.explain.engine_gradcam import EngineGradCAMError, openvino_runner

    block_import(monkeypatch, "openvino")
    with pytest.raises(
        EngineGradCAMError, match=r"the openvino engine needs OpenVINO: pip install 'polypseg\[openvino\]'"
    ):
        openvino_runner(tmp_path / "never read.onnx")
