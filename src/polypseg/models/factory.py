"""Model construction: a small registry over segmentation-models-pytorch.

``create_model(ModelConfig(...))`` is the one entry point. The paper's model is the default:
U-Net, ResNet-34 encoder, nearest-neighbour x2 upsampling, Conv-BN-ReLU decoder blocks, 1x1 head.
The head outputs logits; the sigmoid is applied by callers (losses work on logits for stability).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.unet import decoder as smp_unet
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from polypseg.core.config import ConfigError, ModelConfig
from polypseg.errors import PolypsegError

DECODER_ATTENTION = ("none", "scse")

MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "manet": smp.MAnet,
    "linknet": smp.Linknet,
}


class EncoderWeightsError(PolypsegError):
    """Encoder weights could not be had (offline without cache, or a bad local file)."""


class NoSkipUnetDecoder(UnetDecoder):
    """U-Net decoder with every skip connection removed (the paper's proposed skip ablation).

    Same blocks and channel widths as the U-Net decoder, but each block sees only the upsampled
    output of the block below, so all spatial detail must come through the bottleneck.
    """

    def __init__(self, encoder_channels: list[int], **kwargs: Any) -> None:
        no_skip_channels = [encoder_channels[0]] + [0] * (len(encoder_channels) - 2) + [encoder_channels[-1]]
        super().__init__(no_skip_channels, **kwargs)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        spatial_shapes = [feature.shape[2:] for feature in features][::-1]
        x = self.center(features[-1])
        for i, block in enumerate(self.blocks):
            height, width = spatial_shapes[i + 1]
            x = block(x, height, width, skip_connection=None)
        return x


def _channels_last_contiguous(grad: torch.Tensor) -> torch.Tensor:
    """A channel slice of a channels-last gradient, made channels-last-contiguous; anything else as is."""
    if grad.dim() == 4 and grad.stride(1) == 1 and not grad.is_contiguous(memory_format=torch.channels_last):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad


class UnetDecoderBlock(smp_unet.UnetDecoderBlock):
    """smp's U-Net decoder block (same weights, same outputs) whose upsampled map takes its gradient
    channels-last-contiguous in a CPU backward.

    Why by hand: in a channels-last backward the concatenation hands the upsampling a channel slice
    of its gradient, and ATen's CPU ``upsample_nearest2d_backward`` converts such a slice to NCHW
    and back. Measured on 2 AMX cores, bf16 (benchmarks/cpu_checks.py upsample): 53 ms for one
    ``[16, 64, 128, 128]`` map against 18 ms for a channels-last copy plus the fast kernel; 4% of the
    paper's whole bf16 training step.
    NCHW gradients (fp32 on CPU) are left untouched, so that path stays bit for bit smp's.
    """

    def forward(
        self,
        feature_map: torch.Tensor,
        target_height: int,
        target_width: int,
        skip_connection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        feature_map = F.interpolate(feature_map, size=(target_height, target_width), mode=self.interpolation_mode)
        if skip_connection is not None:
            if feature_map.requires_grad and feature_map.device.type == "cpu":
                feature_map.register_hook(_channels_last_contiguous)
            feature_map = torch.cat([feature_map, skip_connection], dim=1)
            feature_map = self.attention1(feature_map)
        feature_map = self.conv1(feature_map)
        feature_map = self.conv2(feature_map)
        return self.attention2(feature_map)


def available_models() -> list[str]:
    return sorted(MODELS)


def check_model_config(config: ModelConfig) -> None:
    """Fail before any work on an unknown arch, encoder or attention, decoder settings the
    architecture refuses, unreachable ImageNet weights or a missing weights file.

    The architecture is checked by building it on PyTorch's ``meta`` device: module shapes only, no
    memory for weights and nothing loaded (a weights file's tensors are checked when training loads
    them; that it exists, by :func:`polypseg.core.config.validate_config`). Raises :class:`ConfigError`
    with a one-line message.
    """
    try:
        with torch.device("meta"):
            create_model(config, encoder_weights="none")
    except (ValueError, KeyError) as error:
        message = str(error.args[0]) if error.args else str(error)
        raise ConfigError(f"invalid model settings: {message[:300]}") from None
    if config.encoder_weights == "imagenet":
        _fail_fast_if_weights_unreachable(config.encoder)


def create_model(config: ModelConfig | None = None, **overrides: Any) -> nn.Module:
    """Build a segmentation model from a :class:`ModelConfig` (fields may be overridden by keyword).

    Raises :class:`EncoderWeightsError` with a one-line, actionable message if the requested
    encoder weights cannot be loaded.
    """
    config = config or ModelConfig()
    if overrides:
        config = ModelConfig(**{**config.__dict__, **overrides})
    if config.arch not in MODELS:
        raise ConfigError(f"unknown architecture '{config.arch}'; choose one of: {', '.join(available_models())}")
    if not config.skip_connections and config.arch != "unet":
        raise ConfigError("the skip-connection ablation is defined for arch 'unet' only")
    if config.decoder_attention not in DECODER_ATTENTION:
        raise ConfigError(
            f"unknown decoder_attention '{config.decoder_attention}'; choose one of: {', '.join(DECODER_ATTENTION)}"
        )
    attention = None if config.decoder_attention == "none" else config.decoder_attention
    if attention is not None and config.arch not in ("unet", "unetplusplus"):
        raise ConfigError(f"decoder_attention '{attention}' is defined for arch 'unet' and 'unetplusplus' only")

    weights = config.encoder_weights or "none"
    smp_weights = "imagenet" if weights == "imagenet" else None
    kwargs: dict[str, Any] = dict(
        encoder_name=config.encoder,
        encoder_weights=smp_weights,
        in_channels=config.in_channels,
        classes=config.classes,
        activation=None,
    )
    if config.arch in ("unet", "unetplusplus"):
        kwargs["decoder_channels"] = tuple(config.decoder_channels)
        kwargs["decoder_attention_type"] = attention
    if smp_weights is not None:
        _fail_fast_if_weights_unreachable(config.encoder)
    try:
        model = MODELS[config.arch](**kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        if smp_weights is None:
            raise
        raise EncoderWeightsError(
            f"ImageNet weights for encoder '{config.encoder}' are not in the local cache and cannot be "
            f"downloaded ({type(error).__name__}). Run once with internet access to fill the cache "
            "(~/.cache/huggingface), or pass --encoder-weights PATH to a local torchvision ResNet "
            "state dict, or --encoder-weights none."
        ) from None

    if config.arch == "unet" and not config.skip_connections:
        model.decoder = NoSkipUnetDecoder(
            list(model.encoder.out_channels),
            decoder_channels=tuple(config.decoder_channels),
            n_blocks=len(config.decoder_channels),
            attention_type=attention,
        )
    if config.arch == "unet":
        for block in model.decoder.blocks:
            block.__class__ = UnetDecoderBlock  # same modules and state dict, the forward above
    if weights not in ("none", "imagenet"):
        load_encoder_weights(model, Path(weights))
    return model


def _fail_fast_if_weights_unreachable(encoder: str) -> None:
    """Offline with an empty cache, smp's download would retry for ~20 s before failing: check first.

    A cached copy (filled by an earlier online run) is always used; otherwise the Hugging Face host
    must resolve, or we stop at once with the same one-line advice.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if settings is None:
        return  # let smp raise its own error for unknown weights
    cached = try_to_load_from_cache(settings["repo_id"], "model.safetensors", revision=settings["revision"])
    if isinstance(cached, str):
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise EncoderWeightsError(
            f"ImageNet weights for encoder '{encoder}' are not in the local cache and {host} cannot be "
            "reached. Run once with internet access to fill the cache (~/.cache/huggingface), or pass "
            "--encoder-weights PATH to a local torchvision ResNet state dict, or --encoder-weights none."
        ) from None


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Load a torchvision-style ResNet state dict (``conv1.weight``, ``layer1.0...``) into the encoder.

    ``.safetensors`` files are read directly; ``.pth``/``.pt`` files are read with
    ``torch.load(weights_only=True)``, which refuses to execute pickled code.
    """
    if not path.is_file():
        raise EncoderWeightsError(f"encoder weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any decoding failure is a bad file for the user
        raise EncoderWeightsError(f"cannot read encoder weights {path}: {error}".splitlines()[0]) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    encoder = model.encoder  # type: ignore[attr-defined]
    try:
        # nn.Module's method: smp's encoder override drops the missing/unexpected report
        missing, unexpected = nn.Module.load_state_dict(encoder, state, strict=False)
    except RuntimeError as error:
        raise EncoderWeightsError(f"encoder weights {path} do not fit encoder: {str(error).splitlines()[0]}") from None
    if missing or unexpected:
        raise EncoderWeightsError(
            f"encoder weights {path} do not fit the encoder: {len(missing)} missing key(s) "
            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def final_decoder_layer(model: nn.Module) -> nn.Module:
    """The last decoder feature map's module: the paper's Grad-CAM layer."""
    decoder = model.decoder  # type: ignore[attr-defined]
    if hasattr(decoder, "blocks"):
        blocks = decoder.blocks
        return blocks[-1] if isinstance(blocks, nn.ModuleList) else list(blocks.values())[-1]
    return decoder
