from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from polypseg.cli.common import UsageError
from polypseg.cli.main import app
from polypseg.core.io_utils import atomic_write_json, read_json
from polypseg.core.runs import RunDir
from polypseg.data.cache import build_cache
from polypseg.experiments.cv import RunError
from polypseg.experiments.external import dataset_name, evaluate_external
from polypseg.experiments.pranet import evaluate_pranet, literature_metrics, run_pranet
from polypseg.experiments.studies import _share_splits, run_skip_ablation
from polypseg.experiments.study_common import StudyError
from polypseg.metrics.segmentation import dice_score
from polypseg.models.checkpoint import find_checkpoints, load_checkpoint
from polypseg.models.factory import EncoderWeightsError, NoSkipUnetDecoder
from polypseg.training.evaluation import predict_probabilities

from helpers import TINY_MODEL, tiny_config, write_synthetic_dataset

TINY_SETS = [
    "--set",
    f"model.encoder={TINY_MODEL['encoder']}",
    "--set",
    "model.decoder_channels=[16,16,16,16,16]",
    "--set",
    "train.batch_size=4",
]


@pytest.fixture(scope="module")
def external_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic-ext", n=8)


def test_external_evaluation_of_a_cv_run(tiny_cv_run: Path, external_data: Path, tmp_path: Path) -> None:
    result = evaluate_external(
        tiny_cv_run, external_data, out=tmp_path, device="cpu", cache_dir=tmp_path / "cache", progress=False
    )
    assert (tmp_path / "external_synthetic-ext.json").is_file() and (tmp_path / "external_synthetic-ext.md").is_file()
    assert [m["name"] for m in result["models"]] == ["fold_0", "fold_1", "ensemble"]
    summary = read_json(tiny_cv_run / "summary.json")
    t = summary["threshold"]
    assert result["threshold"] == t and 0.5 in result["thresholds"] and result["n_images"] == 8
    assert result["warnings"] == []

    # the ensemble, recomputed independently: mean probability of the fold models
    cache = build_cache(external_data, 64, cache_dir=tmp_path / "cache", progress=False)
    probs = torch.stack(
        [predict_probabilities(load_checkpoint(p).model, cache.images) for p in find_checkpoints(tiny_cv_run)]
    ).mean(0)
    expected = dice_score(probs >= t, torch.from_numpy(cache.masks)).mean().item()
    ensemble = result["models"][-1]
    assert ensemble["at"][f"{t:g}"]["dice"] == pytest.approx(expected, abs=1e-6)
    assert np.mean(result["per_image"]["dice"]) == pytest.approx(expected, abs=1e-5)
    low, high = result["ci95"]["dice"]
    assert low <= expected <= high

    in_domain = summary["pooled"]["at"][f"{t:g}"]["dice"]
    assert result["in_domain"]["dice"][f"{t:g}"] == pytest.approx(in_domain)
    assert ensemble["dice_drop"][f"{t:g}"] == pytest.approx(in_domain - expected, abs=1e-6)
    fold0 = result["models"][0]
    assert fold0["in_domain_own_fold_dice"][f"{t:g}"] == summary["per_fold"][0]["at_chosen"]["dice"]
    markdown = (tmp_path / "external_synthetic-ext.md").read_text()
    assert "| **ensemble** |" in markdown and "| folds, mean ± std |" in markdown and "64×64 px" in markdown
    # the exact AUC of the ensemble, from the same probabilities (scikit-learn directly)
    exact = roc_auc_score(cache.masks.reshape(-1).astype(bool), probs.numpy().reshape(-1))
    assert ensemble["auc_exact"] == pytest.approx(exact, abs=1e-4)
    assert f"ensemble {ensemble['auc_exact']:.4f}" in markdown and "exact, from the sorted probabilities" in markdown


def test_external_alias_on_one_checkpoint(tiny_cv_run: Path, external_data: Path, tmp_path: Path) -> None:
    checkpoint = tiny_cv_run / "fold_1" / "best.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "study",
            "external",
            "--model",
            str(checkpoint),
            "--data",
            str(external_data),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    data = read_json(tmp_path / "external_synthetic-ext.json")
    assert [m["name"] for m in data["models"]] == ["fold_1"]
    assert data["in_domain"]["source"] is None and data["models"][0]["dice_drop"]["0.5"] is None
    assert data["per_image"]["model"] == "fold_1" and len(data["per_image"]["dice"]) == data["n_images"]
    assert "95% intervals" in (tmp_path / "external_synthetic-ext.md").read_text()
    assert data["tta_flip"] is False

    # --tta overrides the recipe: its own files, beside the recipe's, with the flips averaged
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(checkpoint), "--data", str(external_data), "--out", str(tmp_path), "--tta"]
        + ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    flipped = read_json(tmp_path / "external_synthetic-ext_tta.json")
    assert flipped["tta_flip"] is True and "Flip test-time" in (tmp_path / "external_synthetic-ext_tta.md").read_text()
    assert flipped["per_image"]["dice"] != data["per_image"]["dice"]
    assert read_json(tmp_path / "external_synthetic-ext.json") == data  # the recipe's result is kept


def test_evaluating_on_the_training_data_is_flagged(tiny_cv_run: Path, external_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_cv_run, run, ignore=shutil.ignore_patterns("figures", "report.html", "last_state.*"))
    config = read_json(run / "config.json")
    config["data"] = str(external_data)  # pretend the run was trained on the data evaluated now
    atomic_write_json(run / "config.json", config)
    splits = read_json(run / "splits.json")
    splits["stems"] += ["case00", "case01"]
    atomic_write_json(run / "splits.json", splits)
    result = evaluate_external(run, external_data, device="cpu", cache_dir=tmp_path / "cache", progress=False)
    assert any("not an external validation" in w for w in result["warnings"])
    assert any("2 image name(s)" in w for w in result["warnings"])
    assert "**Warning:**" in (run / "external_synthetic-ext.md").read_text()


def test_encoder_init_without_weights_stops_at_once(
    external_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants, try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    if isinstance(try_to_load_from_cache(settings["repo_id"], "model.safetensors", revision=settings["revision"]), str):
        pytest.skip("ImageNet weights for resnet18 are cached on this machine")
    monkeypatch.setattr(constants, "ENDPOINT", "https://polypseg-offline.invalid")  # unreachable, online or not
    out = tmp_path / "study"

    def no_back_off(seconds: float) -> None:  # "at once" without a clock: no download is retried
        raise AssertionError(f"slept {seconds} s: the download was retried instead of stopping at once")

    monkeypatch.setattr(time, "sleep", no_back_off)
    result = CliRunner().invoke(
        app,
        [
            "study",
            "encoder-init",
            "--out",
            str(out),
            "--data",
            str(external_data),
            "--recipe",
            "demo",
            "--no-progress",
            *TINY_SETS,
        ],
    )
    assert isinstance(result.exception, EncoderWeightsError), result.exception
    message = str(result.exception)
    assert "\n" not in message and "stopped before training" in message and "--encoder-weights PATH" in message
    assert "cannot be reached" in message  # stopped by the reachability check, not by a failed download
    assert not out.exists()


def test_encoder_init_rejects_bad_weights(external_data: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "resnet18.pth"
    garbage.write_bytes(b"not a state dict")
    args = [
        "study",
        "encoder-init",
        "--out",
        str(tmp_path / "s"),
        "--data",
        str(external_data),
        "--recipe",
        "demo",
        *TINY_SETS,
    ]
    result = CliRunner().invoke(app, [*args, "--encoder-weights", str(garbage)])
    assert isinstance(result.exception, EncoderWeightsError) and str(garbage) in str(result.exception)
    result = CliRunner().invoke(app, [*args, "--encoder-weights", "none"])
    assert isinstance(result.exception, UsageError)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_skip_ablation_end_to_end(external_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        app,
        [
            "study",
            "skip-ablation",
            "--out",
            str(out),
            "--data",
            str(external_data),
            "--recipe",
            "demo",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--no-explain",
            "--device",
            "cpu",
            "--cache-dir",
            str(cache),
            "--no-progress",
            *TINY_SETS,
        ],
    )
    assert result.exit_code == 0, result.output
    with_skips, no_skips = out / "with-skips", out / "no-skips"
    assert read_json(with_skips / "splits.json") == read_json(no_skips / "splits.json")
    assert read_json(with_skips / "config.json")["run"]["model"]["skip_connections"] is True
    assert read_json(no_skips / "config.json")["run"]["model"]["skip_connections"] is False
    assert isinstance(load_checkpoint(no_skips / "fold_0" / "best").model.decoder, NoSkipUnetDecoder)
    assert (with_skips / "report.html").is_file() and (no_skips / "report.html").is_file()

    text = (out / "skip_ablation.md").read_text()
    for needle in (
        "| with-skips |",
        "| no-skips |",
        "| Δ no-skips − with-skips |",
        "Boundary F1",
        "### Paired test across folds: Boundary F1",
        "## At each run's chosen threshold",
    ):
        assert needle in text, needle
    data = read_json(out / "skip_ablation.json")
    assert [r["name"] for r in data["at_0.5"]["runs"]] == ["with-skips", "no-skips"]
    assert set(data["at_0.5"]["paired_tests"]["no-skips"]) >= {"dice", "iou", "boundary_f1"}

    # finished work is kept on --resume, and refused without it
    weights = no_skips / "fold_1" / "best.safetensors"
    stamp = weights.stat().st_mtime_ns
    config = tiny_config(image_size=32)  # the settings the study was started with
    kwargs = dict(folds=2, device="cpu", progress=False, explain=False, cache_dir=cache, report=False)
    run_skip_ablation(external_data, out, config, resume=True, **kwargs)
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(RunError, match="--resume"):
        run_skip_ablation(external_data, out, config, **kwargs)
    with pytest.raises(RunError, match=r"train\.image_size: 32 -> 64"):
        run_skip_ablation(external_data, out, tiny_config(), resume=True, **kwargs)
    # the command resumes with no recipe options: the study's own config, seed and folds
    resumed = CliRunner().invoke(
        app,
        ["study", "skip-ablation", "--out", str(out), "--data", str(external_data), "--resume", "--no-explain"]
        + ["--device", "cpu", "--cache-dir", str(cache), "--no-progress"],
    )
    assert resumed.exit_code == 0, resumed.output
    assert weights.stat().st_mtime_ns == stamp
    # a finished run's report is kept as it is; one missing or older than a fold's results is drawn again
    report = no_skips / "report.html"
    drawn = report.stat().st_mtime_ns
    (with_skips / "report.html").unlink()
    run_skip_ablation(external_data, out, config, resume=True, **{**kwargs, "report": True})
    assert report.stat().st_mtime_ns == drawn
    assert (with_skips / "report.html").is_file()
    os.utime(no_skips / "fold_0" / "metrics.json", ns=(drawn + 1, drawn + 1))
    run_skip_ablation(external_data, out, config, resume=True, **{**kwargs, "report": True})
    assert report.stat().st_mtime_ns > drawn


def test_studies_refuse_runs_on_other_folds(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    atomic_write_json(first / "splits.json", {"k": 2, "folds": [{"fold": 0, "test": ["x"]}]})
    atomic_write_json(second / "splits.json", {"k": 2, "folds": [{"fold": 0, "test": ["y"]}]})
    with pytest.raises(StudyError, match="must share their folds"):
        _share_splits(first, second)
    third = tmp_path / "c"
    _share_splits(first, third)
    assert read_json(third / "splits.json") == read_json(first / "splits.json")


@pytest.mark.slow
def test_pranet_protocol(external_data: Path, tmp_path: Path) -> None:
    test_list = tmp_path / "test.txt"
    test_list.write_text("# held out\ncase00\ncase03\ncase05\n")
    out = tmp_path / "pranet"
    config = tiny_config(image_size=32)
    result = run_pranet(
        external_data, test_list, out, config, device="cpu", progress=False, cache_dir=tmp_path / "cache"
    )
    assert result["n_test"] == 3 and result["per_image"]["stems"] == ["case00", "case03", "case05"]
    assert read_json(out / "split.json")["test"] == ["case00", "case03", "case05"]
    assert result["original_resolution"]["mdice"] == pytest.approx(np.mean(result["per_image"]["dice"]), abs=1e-6)
    # at model resolution our numbers are the ones train_single_split measured on its own
    own = read_json(out / "test_metrics.json")["at"]["0.5"]
    assert result["model_resolution"]["mdice"] == pytest.approx(own["dice"])
    assert result["model_resolution"]["miou"] == pytest.approx(own["iou"])
    text = (out / "pranet.md").read_text()
    assert "| PraNet | 0.898 | 0.840 |" in text and "| ours, original resolution |" in text
    low, high = result["ci95"]["mdice"]
    assert low <= result["original_resolution"]["mdice"] <= high and "95% intervals" in text
    try:
        import py_sod_metrics  # noqa: F401
    except ImportError:
        assert result["literature_metrics"] is None and "pip install" in text
    else:
        assert 0.0 <= result["literature_metrics"]["s_measure"] <= 1.0
    with pytest.raises(StudyError, match="--resume"):
        run_pranet(external_data, test_list, out, config, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    with pytest.raises(RunError, match=r"train\.image_size: 32 -> 64"):  # a resume never changes the recipe silently
        run_pranet(
            external_data,
            test_list,
            out,
            tiny_config(),
            resume=True,
            device="cpu",
            progress=False,
            cache_dir=tmp_path / "cache",
        )
    resumed = CliRunner().invoke(
        app,
        ["study", "pranet", "--data", str(external_data), "--test-list", str(test_list), "--out", str(out), "--resume"]
        + ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
    )
    assert resumed.exit_code == 0, resumed.output
    assert read_json(out / "pranet.json")["n_test"] == 3

    # from a cache file (as on a GPU machine) the original masks are not there: model resolution only
    from polypseg.data.cache import cache_path

    npz = cache_path(external_data, 32, tmp_path / "cache")
    cached = evaluate_pranet(out, npz, test_list, device="cpu", progress=False)
    assert cached["original_resolution"] is None
    assert cached["model_resolution"]["mdice"] == pytest.approx(result["model_resolution"]["mdice"])
    assert "cache file" in (out / "pranet.md").read_text()

    flipped = evaluate_pranet(out, external_data, test_list, device="cpu", progress=False, tta_flip=True)
    assert flipped["tta_flip"] is True and (out / "pranet_tta.json").is_file()
    assert read_json(out / "pranet.json")["tta_flip"] is False  # the recipe's result is kept
    assert flipped["per_image"]["dice"] != result["per_image"]["dice"]


def test_dataset_names() -> None:
    assert dataset_name("data/cvc-clinicdb-test62") == "cvc-clinicdb-test62"
    assert dataset_name(".gpucache/cvc-clinicdb-test62-256.npz") == "cvc-clinicdb-test62"
    assert dataset_name("cache/kvasir-seg-256px-0123456789abcdef.npz") == "kvasir-seg"


def test_literature_metrics_on_hand_made_maps() -> None:
    pytest.importorskip("py_sod_metrics")
    yy, xx = np.mgrid[:64, :80]
    masks = [(yy - 30) ** 2 + (xx - 40) ** 2 <= r**2 for r in (10, 16)]
    perfect = literature_metrics([m.astype(np.float64) for m in masks], masks)
    assert perfect["s_measure"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["weighted_f"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["max_e_measure"] == pytest.approx(1.0, abs=1e-3)  # pysodmetrics adds an epsilon
    assert perfect["mae"] == pytest.approx(0.0, abs=1e-9)
    shifted = literature_metrics([np.roll(m, 8, axis=1).astype(np.float64) * 0.9 for m in masks], masks)
    for name in ("s_measure", "weighted_f", "max_e_measure"):
        assert shifted[name] < perfect[name] - 0.05, name
    assert shifted["mae"] > 0.01


def test_a_tta_result_is_its_own_row_in_the_report(tiny_cv_run: Path, external_data: Path, tmp_path: Path) -> None:
    from polypseg.reporting.report import _external_rows

    run = tmp_path / "run"
    shutil.copytree(tiny_cv_run, run)
    for tta in (None, True):
        evaluate_external(run, external_data, device="cpu", cache_dir=tmp_path / "cache", progress=False, tta_flip=tta)
    rows = _external_rows(RunDir(run))
    assert [(r["dataset"], r["file"]) for r in rows] == [
        ("synthetic-ext", "external_synthetic-ext.json"),
        ("synthetic-ext (flip TTA)", "external_synthetic-ext_tta.json"),
    ]


def test_evaluate_takes_a_shipped_models_name(external_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out for a shipped model is evaluate-NAME here
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", "kvasir-unet-r34", "--data", str(external_data), "--device", "cpu"]
        + ["--cache-dir", str(tmp_path / "cache"), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    data = read_json(tmp_path / "evaluate-kvasir-unet-r34" / "external_synthetic-ext.json")
    assert [m["name"] for m in data["models"]] == ["kvasir-unet-r34"] and data["n_images"] == 8


def test_a_paired_study_checks_every_arm_before_training_any(tmp_path, monkeypatch):
    """skip-ablation --set train.init_from=MODEL failed only after the first arm had trained: the
    no-skip arm cannot start from a model with skips. Now no arm trains."""
    from polypseg.core.config import ConfigError, RunConfig
    from polypseg.experiments import cv
    from polypseg.experiments.studies import run_paired_study

    from helpers import save_tiny_checkpoint, tiny_config

    init = save_tiny_checkpoint(tmp_path / "init")
    with_skips = tiny_config(image_size=32)
    with_skips.model.decoder_channels = (8, 8, 8, 8, 8)
    with_skips.train.init_from = str(init)
    without = RunConfig.from_dict(with_skips.to_dict())
    without.model.skip_connections = False
    started = []
    monkeypatch.setattr(cv, "run_cv", lambda data, out, *a, **k: started.append(out))
    with pytest.raises(ConfigError, match=r"--init .*model\.skip_connections"):
        run_paired_study(tmp_path / "data", tmp_path / "study", {"unet": with_skips, "noskip": without}, progress=False)
    assert started == [] and not (tmp_path / "study").exists()
