"""Every registered model builds on tiny CPU input: forward, backward, save/load (smp's habit)."""

import copy

import pytest
import torch

from polypseg.core.config import ModelConfig, RunConfig
from polypseg.models.checkpoint import load_checkpoint, save_checkpoint
from polypseg.models.factory import (
    MODELS,
    EncoderWeightsError,
    NoSkipUnetDecoder,
    count_parameters,
    create_model,
    final_decoder_layer,
)

SMALL = dict(encoder="resnet18")


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_model_forward_backward_save_load(arch, tmp_path):
    config = ModelConfig(arch=arch, **SMALL)
    model = create_model(config)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 1, 64, 64)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    path = save_checkpoint(tmp_path / "m", model, RunConfig(model=config))
    loaded = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_scse_decoder_attention(arch):
    plain = create_model(ModelConfig(arch=arch, **SMALL))
    scse = create_model(ModelConfig(arch=arch, decoder_attention="scse", **SMALL))
    assert count_parameters(scse) > count_parameters(plain)
    assert any(type(m).__name__ == "SCSEModule" for m in scse.modules())
    assert not any(type(m).__name__ == "SCSEModule" for m in plain.modules())
    no_skip = create_model(ModelConfig(decoder_attention="scse", skip_connections=False, **SMALL))
    assert isinstance(no_skip.decoder, NoSkipUnetDecoder) and any(
        type(m).__name__ == "SCSEModule" for m in no_skip.modules()
    )
    out = scse(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    with pytest.raises(ValueError, match="decoder_attention"):
        create_model(ModelConfig(arch="fpn", decoder_attention="scse", **SMALL))
    with pytest.raises(ValueError, match="unknown decoder_attention"):
        create_model(ModelConfig(decoder_attention="cbam", **SMALL))


def test_paper_model_is_unet_resnet34_with_24_4m_parameters():
    model = create_model()
    assert 24_300_000 < count_parameters(model) < 24_500_000
    assert type(model).__name__ == "Unet"
    assert model.decoder.blocks[0].interpolation_mode == "nearest"


def test_unet_decoder_blocks_match_smps_and_pass_channels_last_gradients_contiguous(monkeypatch):
    """Same outputs and gradients as smp's own block; in channels-last the upsampling's gradient
    is made channels-last-contiguous, in NCHW it is left alone (bit for bit smp's)."""
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock as SmpBlock

    from polypseg.models import factory
    from polypseg.models.factory import UnetDecoderBlock, _channels_last_contiguous

    seen: list[bool] = []  # per hook call: was the gradient a channels-last slice?

    def recording(grad: torch.Tensor) -> torch.Tensor:
        seen.append(grad.stride(1) == 1 and not grad.is_contiguous(memory_format=torch.channels_last))
        return _channels_last_contiguous(grad)

    monkeypatch.setattr(factory, "_channels_last_contiguous", recording)
    assert all(type(block) is UnetDecoderBlock for block in create_model(**SMALL).decoder.blocks)
    ours = UnetDecoderBlock(32, 16, 8)
    theirs = copy.deepcopy(ours)
    theirs.__class__ = SmpBlock
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        x = torch.randn(2, 32, 8, 8).contiguous(memory_format=layout)
        skip = torch.randn(2, 16, 16, 16).contiguous(memory_format=layout)
        grads = []
        for block in (ours, theirs):
            block.zero_grad()
            xi, si = x.clone().requires_grad_(), skip.clone().requires_grad_()
            out = block(xi, 16, 16, skip_connection=si)
            out.square().sum().backward()
            grads.append((out.detach(), xi.grad, si.grad, block.conv1[0].weight.grad.clone()))
        for a, b in zip(*grads, strict=True):
            if layout == torch.contiguous_format:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert seen == [False, True]  # the NCHW backward's gradient left alone, the channels-last one fixed

    sliced = torch.randn(2, 48, 4, 4).contiguous(memory_format=torch.channels_last)[:, :32]
    fixed = _channels_last_contiguous(sliced)
    assert fixed.is_contiguous(memory_format=torch.channels_last) and torch.equal(fixed, sliced)
    nchw_slice = torch.randn(2, 48, 4, 4)[:, :32]
    assert _channels_last_contiguous(nchw_slice) is nchw_slice


def test_skip_ablation_removes_skip_inputs():
    with_skips = create_model(**SMALL)
    no_skips = create_model(skip_connections=False, **SMALL)
    assert isinstance(no_skips.decoder, NoSkipUnetDecoder)
    # first conv of each block only sees the upsampled path: fewer input channels
    assert no_skips.decoder.blocks[0].conv1[0].in_channels == 512
    assert with_skips.decoder.blocks[0].conv1[0].in_channels == 512 + 256
    assert count_parameters(no_skips) < count_parameters(with_skips)
    assert no_skips(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_skip_ablation_output_ignores_encoder_skip_features():
    model = create_model(skip_connections=False, **SMALL).eval()
    features = model.encoder(torch.randn(1, 3, 64, 64))
    changed = [f.clone() for f in features]
    for f in changed[:-1]:
        f.normal_()  # scramble every skip feature, keep the bottleneck
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(features), model.decoder(changed))


def test_skip_ablation_only_for_unet():
    with pytest.raises(ValueError, match="unet"):
        create_model(arch="fpn", skip_connections=False, **SMALL)


def test_final_decoder_layer_is_last_block():
    model = create_model(**SMALL)
    assert final_decoder_layer(model) is model.decoder.blocks[-1]


def test_encoder_weights_from_torchvision_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = create_model(encoder="resnet18", encoder_weights=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(model.encoder.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.encoder.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_encoder_weights_from_safetensors(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    reference = torchvision.models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = create_model(encoder="resnet18", encoder_weights=str(tmp_path / "r18.safetensors"))
    torch.testing.assert_close(model.encoder.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_encoder_weights_wrong_architecture_is_one_line_error(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(EncoderWeightsError, match="do not fit") as info:
        create_model(encoder="resnet34", encoder_weights=str(tmp_path / "r18.pth"))
    assert "\n" not in str(info.value)


def test_encoder_weights_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(EncoderWeightsError, match="cannot read"):
        create_model(encoder="resnet18", encoder_weights=str(tmp_path / "evil.pth"))


def test_missing_weights_file():
    with pytest.raises(EncoderWeightsError, match="not found"):
        create_model(encoder="resnet18", encoder_weights="/nonexistent/w.pth")


def test_imagenet_offline_without_cache_fails_fast_with_advice(tmp_path, monkeypatch):
    import time

    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://polypseg-no-such-host.invalid")

    def no_back_off(seconds: float) -> None:  # "fast" without a clock: the download is never retried
        raise AssertionError(f"slept {seconds} s: the download was retried instead of stopping at once")

    monkeypatch.setattr(time, "sleep", no_back_off)
    with pytest.raises(EncoderWeightsError, match="cannot be reached") as info:  # the pre-check stopped it
        create_model(encoder="resnet18", encoder_weights="imagenet")
    assert "--encoder-weights" in str(info.value)
    assert "\n" not in str(info.value)


def test_imagenet_weights_come_from_local_cache_when_offline(tmp_path, monkeypatch):
    """smp's normal mechanism: a Hugging Face cache filled earlier is used without network."""
    import json

    from huggingface_hub import constants as hf_constants
    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    repo, revision = settings["repo_id"], settings["revision"]
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    reference = create_model(encoder="resnet18").encoder
    state = {k: v.clone().fill_(0.125) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({}))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model = create_model(encoder="resnet18", encoder_weights="imagenet")
    assert torch.all(model.encoder.conv1.weight == 0.125)


def test_checking_a_model_config_allocates_and_loads_no_weights(monkeypatch, tmp_path):
    """Option validation builds the architecture on the meta device only, and reads no weights file."""
    from polypseg.core.config import ConfigError, ModelConfig
    from polypseg.models import factory

    built = []
    real = factory.create_model

    def spy(config, **overrides):
        model = real(config, **overrides)
        built.append({parameter.device.type for parameter in model.parameters()})
        return model

    monkeypatch.setattr(factory, "create_model", spy)
    unreadable = tmp_path / "r34.pth"
    unreadable.write_bytes(b"not a state dict")  # loading it would fail: the check must not load it
    factory.check_model_config(ModelConfig(encoder_weights=str(unreadable)))
    assert built == [{"meta"}]
    with pytest.raises(ConfigError, match="invalid model settings: .*decoder_channels"):
        factory.check_model_config(ModelConfig(decoder_channels=(16, 16, 16)))
