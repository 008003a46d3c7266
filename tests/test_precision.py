"""The one precision rule (auto/fp32/bf16) and progressive resizing, on tiny CPU inputs."""

from __future__ import annotations

import pytest
import torch

from polypseg.core import precision
from polypseg.core.config import RunConfig
from polypseg.core.recipes import get_recipe
from polypseg.data.augment import augment_batch
from polypseg.data.transforms import normalize
from polypseg.errors import PolypsegError
from polypseg.models.factory import create_model
from polypseg.training.evaluation import predict_probabilities
from polypseg.training.loop import TrainStep, downsample_batch, epoch_size, resolve_run_precision

from helpers import tiny_config

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))


def test_cpuinfo_flags_are_parsed():
    assert {"avx512_bf16", "avx512f", "sse2"} <= precision._cpuinfo_flags(CPUINFO)
    assert precision._cpuinfo_flags("no flags here") == set()
    assert precision.cpu_bf16_flags({"amx_bf16", "avx512_bf16", "avx2"}) == ["amx_bf16", "avx512_bf16"]


@pytest.mark.parametrize(
    ("flags", "device", "expected"),
    [
        ({"amx_bf16", "avx512_bf16"}, "cpu", "bf16"),
        ({"avx512_bf16"}, "cpu", "bf16"),
        ({"avx2", "avx512f"}, "cpu", "fp32"),
        (set(), "cpu", "fp32"),
        (set(), "cuda", "bf16"),
    ],
)
def test_auto_follows_the_hardware(flags, device, expected):
    assert precision.resolve_precision("auto", device, flags=flags) == expected


def test_explicit_choices_pass_through_and_bad_ones_are_user_errors():
    assert precision.resolve_precision("fp32", "cpu", flags={"amx_bf16"}) == "fp32"
    assert precision.resolve_precision("bf16", "cpu", flags=set()) == "bf16"
    with pytest.raises(PolypsegError, match="fp16"):
        precision.resolve_precision("fp16", "cpu")


def test_channels_last_only_with_bf16_on_cpu(no_bf16):
    assert not precision.use_channels_last("cpu", "fp32")
    assert not precision.use_channels_last("cpu", "auto")  # no native bf16 here
    assert precision.use_channels_last("cpu", "bf16")
    assert not precision.use_channels_last("cpu", "bf16", requested=False)
    assert precision.use_channels_last("cuda", "fp32")


def test_cpu_without_bf16_falls_back_to_the_fp32_nchw_step(no_bf16):
    config = tiny_config(image_size=32)
    assert config.train.precision == "auto"
    step = TrainStep(config, torch.device("cpu"))
    assert step.precision == "fp32" and not step.channels_last
    conv = step.model.encoder.conv1.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    assert not step.optimizer.defaults["fused"]  # torch's default update, as before bf16 existed
    assert "fp32" in precision.describe("auto", "cpu") and "no native bf16" in precision.describe("auto", "cpu")


def test_cpu_with_bf16_trains_in_bf16_channels_last_with_fp32_master_weights(native_bf16):
    config = tiny_config(image_size=32)
    step = TrainStep(config, torch.device("cpu"))
    assert step.precision == "bf16" and step.channels_last
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).to(torch.uint8)
    loss = step(images, masks, 1e-3, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in step.model.parameters())
    state = step.optimizer.state_dict()["state"]
    assert state and all(v["exp_avg"].dtype == torch.float32 for v in state.values())
    assert step.optimizer.defaults["fused"]  # the single-kernel CPU update: bf16 runs only


def test_explicit_fp32_keeps_the_foreach_update_on_a_bf16_cpu(native_bf16):
    """--precision fp32 gives today's numbers bit for bit: the fused update rounds differently."""
    config = tiny_config(image_size=32)
    config.train.precision = "fp32"
    step = TrainStep(config, torch.device("cpu"))
    assert step.precision == "fp32" and not step.optimizer.defaults["fused"]
    torch.manual_seed(0)
    reference = create_model(config.model)
    reference.load_state_dict(step.model.state_dict())
    adam = torch.optim.Adam(reference.parameters(), lr=1e-3, weight_decay=config.train.weight_decay)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).to(torch.uint8)
    step(images, masks, 1e-3, torch.Generator().manual_seed(0))
    x, y = augment_batch(images.float().div(255), masks.float(), config.train.augment, torch.Generator().manual_seed(0))
    loss = step.loss_fn(reference(normalize(x)), y)
    loss.backward()
    adam.step()
    for mine, theirs in zip(step.model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_fp32_prediction_is_exactly_the_plain_forward():
    torch.manual_seed(0)
    model = create_model(tiny_config().model).eval()
    images = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        reference = torch.sigmoid(model(normalize(images.permute(0, 3, 1, 2))))[:, 0]
    assert torch.equal(predict_probabilities(model, images, precision="fp32"), reference)


def test_bf16_prediction_is_float32_and_close_to_fp32():
    torch.manual_seed(0)
    model = create_model(tiny_config().model).eval()
    images = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    fp32 = predict_probabilities(model, images, precision="fp32")
    bf16 = predict_probabilities(model, images, precision="bf16")
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert not torch.equal(bf16, fp32)  # it really ran in bf16
    assert (bf16 - fp32).abs().mean() < 0.02 and (bf16 - fp32).abs().max() < 0.1
    assert torch.corrcoef(torch.stack([bf16.flatten(), fp32.flatten()]))[0, 1] > 0.99


def test_runs_save_the_resolved_precision(native_bf16):
    config = resolve_run_precision(tiny_config(), "cpu")
    assert config.train.precision == "bf16"
    config = tiny_config()
    config.train.precision = "fp32"
    assert resolve_run_precision(config, "cpu").train.precision == "fp32"


@pytest.mark.parametrize(("amp", "expected"), [(True, "auto"), (False, "fp32")])
def test_configs_from_before_precision_still_load(amp, expected):
    data = get_recipe("paper").to_dict()
    del data["train"]["precision"]
    data["train"]["amp"] = amp
    assert RunConfig.from_dict(data).train.precision == expected


def test_downsample_keeps_masks_binary_and_area():
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., :4, :] = 1  # top half
    images = torch.rand(1, 3, 8, 8)
    small_images, small_masks = downsample_batch(images, masks, 4)
    assert small_images.shape == (1, 3, 4, 4) and small_masks.shape == (1, 1, 4, 4)
    assert set(small_masks.unique().tolist()) == {0.0, 1.0}
    assert small_masks.mean() == pytest.approx(0.5)
    assert torch.allclose(small_images[0, :, 0, 0], images[0, :, :2, :2].mean(dim=(1, 2)))


def test_progressive_epochs_then_full_size():
    config = get_recipe("cpu").train
    assert epoch_size(config, 0) == config.progressive_size
    assert epoch_size(config, config.progressive_epochs - 1) == config.progressive_size
    assert epoch_size(config, config.progressive_epochs) is None
    assert epoch_size(get_recipe("paper").train, 0) is None


def test_a_progressive_step_runs_at_the_small_size(no_bf16):
    config = tiny_config(image_size=32)
    step = TrainStep(config, torch.device("cpu"))
    seen = []
    step.forward_model = lambda x: (seen.append(x.shape[-1]), step.model(x))[1]
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).to(torch.uint8)
    step(images, masks, 1e-3, torch.Generator().manual_seed(0), size=16)
    step(images, masks, 1e-3, torch.Generator().manual_seed(0))
    assert seen == [16, 32]


def test_gradcam_in_bf16_matches_fp32(tiny_cv_run):
    """The same precision rule for Grad-CAM: bf16 heatmaps correlate >= 0.99 with fp32 ones."""
    import numpy as np

    from polypseg.data.images import read_image
    from polypseg.data.sample_data import sample_dataset_path
    from polypseg.explain.gradcam import explain_images
    from polypseg.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tiny_cv_run / "fold_0" / "best")
    images = [read_image(p) for p in sorted((sample_dataset_path() / "images").glob("*.jpg"))[:4]]
    size = checkpoint.config.train.image_size
    maps = {
        p: explain_images(checkpoint.model, images, image_size=size, threshold=0.3, precision=p)
        for p in ("fp32", "bf16")
    }
    compared = 0
    for h32, p32, h16, p16 in zip(*maps["fp32"], *maps["bf16"], strict=False):
        assert h16.dtype == np.float32 and h16.shape == h32.shape
        # bf16 moves a probability by about 1% on average (a few pixels near 0.5 by more)
        assert np.abs(p16 - p32).mean() < 0.02
        assert np.corrcoef(p32.ravel(), p16.ravel())[0, 1] >= 0.99
        if h32.max() > 0:  # a predicted mask: its heatmap must agree
            assert np.corrcoef(h32.ravel(), h16.ravel())[0, 1] >= 0.99
            compared += 1
    assert compared >= 2


def test_the_precision_line_follows_channels_last_and_names_compile_off_cuda(native_bf16, tmp_path, monkeypatch):
    """train.channels_last=false printed "channels-last" all the same, and train.compile on a CPU was
    silently not compiled; the start of polypseg train now says what the run does."""
    from typer.testing import CliRunner

    from polypseg.cli.main import app
    from polypseg.training import train_split

    assert "(channels-last;" in precision.describe("auto", "cpu")
    assert "(NCHW;" in precision.describe("auto", "cpu", channels_last=False)
    monkeypatch.setattr(train_split, "train_single_split", lambda *a, **k: {"checkpoint": "none"})
    settings = ["--set", "train.channels_last=false", "--set", "train.compile=true"]
    args = ["train", "--recipe", "demo", "--device", "cpu", "--out", str(tmp_path / "run"), *settings]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "precision: auto -> bf16 (NCHW;" in result.output
    assert "note: train.compile applies on CUDA only; on cpu the model trains uncompiled" in result.output
