"""Cross-validation discipline: split saved once and reused, folds finished are untouched, OOF pooled."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polypseg.core.io_utils import atomic_write_json
from polypseg.core.runs import RunDir
from polypseg.experiments.cv import RunError, make_splits, run_cv, summarize_run

from helpers import tiny_config, write_synthetic_dataset


def test_splits_partition_and_are_seeded():
    stems = [f"s{i}" for i in range(23)]
    splits = make_splits(stems, folds=5, seed=3, val_fraction=0.2)
    tests = [set(f["test"]) for f in splits["folds"]]
    assert set().union(*tests) == set(stems)
    assert sum(len(t) for t in tests) == len(stems)  # disjoint
    for fold in splits["folds"]:
        assert not set(fold["val"]) & set(fold["test"])
        assert not set(fold["train"]) & set(fold["test"])
        assert set(fold["train"]) | set(fold["val"]) | set(fold["test"]) == set(stems)
        assert len(fold["val"]) == round(0.2 * (len(stems) - len(fold["test"])))
    assert make_splits(list(reversed(stems)), 5, 3, 0.2) == splits  # input order does not matter
    assert make_splits(stems, 5, 4, 0.2) != splits


@pytest.fixture()
def dataset(tmp_path):
    return write_synthetic_dataset(tmp_path / "data", n=8)


def _run(dataset, out, cache, **kwargs):
    config = tiny_config(epochs=1, image_size=32)
    return run_cv(
        dataset,
        out,
        config,
        folds=2,
        device="cpu",
        progress=False,
        explain=False,
        report=False,
        cache_dir=cache,
        **kwargs,
    )


@pytest.mark.slow
def test_cv_end_to_end_and_resume(dataset, tmp_path):
    run = tmp_path / "run"
    summary = _run(dataset, run, tmp_path / "cache")
    assert summary.n_images == 8 and summary.folds == 2
    assert 0.3 <= summary.threshold <= 0.7
    for key in ("dice", "iou", "auc", "sensitivity", "precision"):
        mean, std = summary.mean_std.at_0_5[key]
        assert np.isfinite(mean) or key in ("sensitivity", "precision")
    oof_stems = []
    for fold in (0, 1):
        with np.load(run / f"fold_{fold}" / "oof.npz") as data:
            oof_stems += list(data["stems"])
            assert data["probs"].dtype == np.uint8
    assert sorted(oof_stems) == sorted(json.loads((run / "splits.json").read_text())["stems"])
    assert (run / "summary.md").read_text().startswith("# Cross-validation summary")
    from polypseg._version import source_commit

    invocation = json.loads((run / "invocations.json").read_text())["invocations"][-1]
    assert invocation.get("commit") == source_commit()  # the code that ran, where it is a checkout
    exact = [json.loads((run / f"fold_{fold}" / "metrics.json").read_text())["auc_exact"] for fold in (0, 1)]
    assert [f.auc_exact for f in summary.per_fold] == exact
    assert summary.auc_exact[0] == pytest.approx(np.mean(exact))
    assert "Exact, from each fold's float probabilities" in (run / "summary.md").read_text()

    with pytest.raises(RunError, match="--resume"):
        _run(dataset, run, tmp_path / "cache")

    # simulate a kill during fold 1: its evaluation is lost, fold 0 stays finished
    (run / "fold_1" / "metrics.json").unlink()
    fold0_mtime = (run / "fold_0" / "metrics.json").stat().st_mtime_ns
    splits_before = (run / "splits.json").read_text()
    resumed = run_cv(
        dataset,
        run,
        None,
        resume=True,
        device="cpu",
        progress=False,
        explain=False,
        report=False,
        cache_dir=tmp_path / "cache",
    )
    assert (run / "fold_0" / "metrics.json").stat().st_mtime_ns == fold0_mtime
    assert (run / "fold_1" / "metrics.json").is_file()
    assert (run / "splits.json").read_text() == splits_before
    assert resumed.mean_std.at_0_5["dice"] == pytest.approx(summary.mean_std.at_0_5["dice"])

    # rerunning the command that started the run, plus resume, continues it; other settings are refused
    again = _run(dataset, run, tmp_path / "cache", resume=True)
    assert again.mean_std.at_0_5["dice"] == pytest.approx(summary.mean_std.at_0_5["dice"])
    changed = tiny_config(epochs=2, image_size=32)
    with pytest.raises(RunError, match=r"train\.epochs: 1 -> 2"):
        run_cv(dataset, run, changed, folds=2, resume=True, progress=False, report=False, cache_dir=tmp_path / "cache")
    with pytest.raises(RunError, match="folds: 2 -> 5"):
        run_cv(dataset, run, None, folds=5, resume=True, progress=False, report=False, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_partial_run_says_so_and_completes_on_resume(dataset, tmp_path):
    run = tmp_path / "run"
    partial = _run(dataset, run, tmp_path / "cache", only_folds=[0])
    assert (partial.folds, partial.folds_planned) == (1, 2)
    assert not (run / "fold_1").exists()
    saved = json.loads((run / "summary.json").read_text())
    assert saved["mean_std"]["at_0.5"]["dice"][1] is None  # one fold: no spread, stored as null
    text = (run / "summary.md").read_text()
    assert "1 of 2 folds finished (a partial run" in text and "± 0.0000" not in text
    full = _run(dataset, run, tmp_path / "cache", resume=True)
    assert (full.folds, full.folds_planned) == (2, 2)
    assert "2 folds," in (run / "summary.md").read_text()


@pytest.mark.slow
def test_summary_is_written_after_each_fold_so_a_stopped_run_shows_its_finished_folds(dataset, tmp_path, monkeypatch):
    import polypseg.experiments.cv

    class Stopped(Exception):
        pass

    real_train_model = polypseg.experiments.cv.train_model

    def train_until_fold_1(config, train, val, out_dir, **kwargs):
        if Path(out_dir).name == "fold_1":
            raise Stopped
        return real_train_model(config, train, val, out_dir, **kwargs)

    monkeypatch.setattr(polypseg.experiments.cv, "train_model", train_until_fold_1)
    run = tmp_path / "run"
    with pytest.raises(Stopped):
        _run(dataset, run, tmp_path / "cache")
    saved = json.loads((run / "summary.json").read_text())
    assert (saved["folds"], saved["folds_planned"]) == (1, 2)
    assert saved["per_fold"][0]["training"]["epochs"] == 1
    assert "1 of 2 folds finished" in (run / "summary.md").read_text()


def test_split_of_other_data_is_refused(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.json").write_text(json.dumps({"stems": ["x"], "k": 2, "folds": []}))
    with pytest.raises(RunError, match="different data"):
        _run(dataset, run, tmp_path / "cache")


def test_a_start_that_cannot_split_leaves_no_settings_and_negative_seeds_are_refused(dataset, tmp_path):
    """More folds than pairs fails before config.json is written, so a retry with other folds starts
    the run instead of calling the folder taken; a negative seed is a ConfigError, not numpy's."""
    from polypseg.core.config import ConfigError
    from polypseg.data.images import DataError

    run = RunDir(tmp_path / "run")
    config, common = tiny_config(), dict(progress=False, report=False, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="cannot be split into 20 folds"):
        run_cv(dataset, run.path, config, folds=20, **common)
    assert not run.has_settings() and run.read_splits() is None
    with pytest.raises(ConfigError, match=r"^seed -1: must be >= 0"):
        run_cv(dataset, run.path, config, folds=2, seed=-1, **common)
    assert not run.has_settings()


def test_resume_without_run_is_refused(tmp_path):
    with pytest.raises(RunError, match="no run"):
        run_cv(tmp_path / "data", tmp_path / "empty", None, resume=True, progress=False)


def test_summary_pools_out_of_fold_predictions(tmp_path):
    """A hand-made run: the threshold sweep and per-fold table come from the OOF files."""
    run = tmp_path / "run"
    probs = np.zeros((2, 4, 4), dtype=np.uint8)
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, :2, :2] = True
    probs[:, :2, :2] = round(0.62 * 255)  # right above 0.6
    probs[:, 2, 2] = round(0.57 * 255)  # a false positive at <= 0.55
    for fold in (0, 1):
        (run / f"fold_{fold}").mkdir(parents=True)
        np.savez(run / f"fold_{fold}" / "oof.npz", stems=np.array([f"a{fold}", f"b{fold}"]), probs=probs, masks=masks)
    (run / "config.json").write_text(json.dumps({"run": {"train": {"recipe": "hand"}}, "data": "x"}))
    summary = summarize_run(run)
    assert summary.threshold == pytest.approx(0.6)
    assert summary.pooled.at["0.6"]["dice"] == pytest.approx(1.0)
    assert summary.pooled.at["0.5"]["dice"] == pytest.approx(2 * 4 / (2 * 4 + 1))
    assert tuple(summary.mean_std.at_chosen["dice"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert summary.pooled.auc == pytest.approx(1.0)
    assert summary.auc_exact is None and "Exact, from" not in (run / "summary.md").read_text()  # no fold has it
    assert "auc_exact" not in json.loads((run / "summary.json").read_text())

    (run / "fold_0" / "metrics.json").write_text(json.dumps({"auc_exact": 0.9}))
    assert summarize_run(run).auc_exact is None  # a mean over some folds only would mislead
    (run / "fold_1" / "metrics.json").write_text(json.dumps({"auc_exact": 0.8}))
    both = summarize_run(run)
    assert both.auc_exact[0] == pytest.approx(0.85) and both.auc_exact[1] == pytest.approx(0.0707107, abs=1e-6)
    assert (
        "Exact, from each fold's float probabilities before storage: **0.8500 ± 0.0707**"
        in (run / "summary.md").read_text()
    )
    for fold in (0, 1):
        (run / f"fold_{fold}" / "metrics.json").unlink()

    assert summary.paused_s is None and "Wall time" not in (run / "summary.md").read_text()
    assert summary.per_fold[0].training is None and "Training time" not in (run / "summary.md").read_text()

    history = [{"epoch": 1, "seconds": 100.0}, {"epoch": 2, "seconds": 5054.0}, {"epoch": 3, "seconds": 110.0}]
    history.append({"epoch": 4, "seconds": 120.0, "paused_seconds": 60.0})
    (run / "fold_0" / "history.json").write_text(json.dumps(history))
    fold0 = summarize_run(run).per_fold[0].training
    assert fold0.to_json() == {"epochs": 4, "seconds": 5384.0, "median_epoch_s": 115.0, "paused_s": 60.0}
    assert json.loads((run / "summary.json").read_text())["per_fold"][0]["training"] == fold0.to_json()
    assert "| 0 | 4 | 115.0 | 89.7 | 1.0 |" in (run / "summary.md").read_text()
    timed = summarize_run(run, wall_time_s=120.0, paused_s=30.0)
    assert (timed.wall_time_s, timed.paused_s) == (120.0, 30.0)
    assert "Wall time of the run: 120.0 s (not counting 30.0 s stopped)." in (run / "summary.md").read_text()


def test_copied_splits_keep_test_folds_with_other_validation_share(tmp_path):
    from polypseg.experiments.cv import load_or_create_splits

    stems = [f"s{i}" for i in range(20)]
    original = load_or_create_splits(tmp_path / "a", stems, 4, 0, 0.1) if (tmp_path / "a").mkdir() is None else None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "splits.json").write_text(json.dumps(original))
    reused = load_or_create_splits(tmp_path / "b", stems, 4, 0, 0.0)
    assert [f["test"] for f in reused["folds"]] == [f["test"] for f in original["folds"]]
    assert all(not f["val"] for f in reused["folds"])
    assert all(len(f["train"]) == 15 for f in reused["folds"])


@pytest.mark.slow
def test_cv_measures_gradcam_per_fold(dataset, tmp_path):
    config = tiny_config(epochs=1, image_size=32)
    summary = run_cv(
        dataset,
        tmp_path / "run",
        config,
        folds=2,
        device="cpu",
        progress=False,
        explain=True,
        explain_max_images=2,
        report=False,
        cache_dir=tmp_path / "cache",
    )
    fold_metrics = json.loads((tmp_path / "run" / "fold_0" / "metrics.json").read_text())
    assert len(fold_metrics["explainability"]["per_image"]) == 2
    assert "energy_inside" in summary.explainability
    assert "Grad-CAM checks" in (tmp_path / "run" / "summary.md").read_text()


def test_cross_fitted_thresholds_never_let_a_fold_choose_its_own(tmp_path):
    """Fold 0 alone would pick 0.6 and fold 1 alone 0.4: each is scored at the other's choice."""
    run = tmp_path / "run"
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, :2, :2] = True
    sharp = np.zeros((2, 4, 4), dtype=np.uint8)
    sharp[:, :2, :2] = round(0.62 * 255)
    sharp[:, 2, 2] = round(0.57 * 255)  # a false positive below 0.6
    faint = np.zeros((2, 4, 4), dtype=np.uint8)
    faint[:, :2, :2] = round(0.42 * 255)  # found only at <= 0.4
    for fold, probs in ((0, sharp), (1, faint)):
        (run / f"fold_{fold}").mkdir(parents=True)
        np.savez(run / f"fold_{fold}" / "oof.npz", stems=np.array([f"a{fold}", f"b{fold}"]), probs=probs, masks=masks)
    (run / "config.json").write_text(json.dumps({"run": {"train": {"recipe": "hand"}}, "data": "x"}))
    summary = summarize_run(run)
    assert [f.crossfit_threshold for f in summary.per_fold] == [0.4, 0.6]
    fold0, fold1 = (f.at_crossfit["dice"] for f in summary.per_fold)
    assert fold0 == pytest.approx(2 * 4 / (2 * 4 + 1)) and fold1 == pytest.approx(0.0)
    assert summary.mean_std.at_crossfit["dice"][0] == pytest.approx((fold0 + fold1) / 2)
    assert "cross-fitted" in (run / "summary.md").read_text()


def test_one_fold_has_no_cross_fitted_threshold(tmp_path):
    run = tmp_path / "run"
    masks = np.ones((2, 4, 4), dtype=bool)
    (run / "fold_0").mkdir(parents=True)
    np.savez(
        run / "fold_0" / "oof.npz", stems=np.array(["a", "b"]), probs=np.full((2, 4, 4), 200, np.uint8), masks=masks
    )
    (run / "config.json").write_text(json.dumps({"run": {"train": {"recipe": "hand"}}, "data": "x"}))
    summary = summarize_run(run)
    assert summary.mean_std.at_crossfit is None and summary.per_fold[0].crossfit_threshold is None
    written = json.loads((run / "summary.json").read_text())
    assert "at_crossfit" not in written["mean_std"] and "crossfit_threshold" not in written["per_fold"][0]


def test_deletion_steps_follow_the_runs_earlier_folds(tmp_path: Path) -> None:
    from polypseg.experiments.cv import _run_deletion_steps

    run = RunDir(tmp_path / "run")
    cpu = torch.device("cpu")
    assert _run_deletion_steps(run, cpu) == 8  # a new run on CPU
    assert _run_deletion_steps(run, torch.device("cuda")) == 20
    atomic_write_json(run.fold_metrics_path(0), {"n_test": 2})  # evaluated without Grad-CAM checks
    atomic_write_json(run.fold_metrics_path(1), {"explainability": {"deletion_steps": 20}})
    assert _run_deletion_steps(run, cpu) == 20  # started on a GPU, resumed on CPU: its folds stay comparable


def test_a_summary_round_trips_byte_identically_through_summary_json(tmp_path):
    """summary.json is CVSummary.to_json(); from_json reads it back to the same bytes, every optional part included."""
    from polypseg.core.io_utils import json_text
    from polypseg.experiments.cv import CVSummary

    run = tmp_path / "run"
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, :2, :2] = True
    probs = np.where(masks, round(0.62 * 255), 0).astype(np.uint8)
    for fold, fold_masks in ((0, masks), (1, np.zeros_like(masks))):  # fold 1 has no polyp: NaN sensitivity
        (run / f"fold_{fold}").mkdir(parents=True)
        np.savez(
            run / f"fold_{fold}" / "oof.npz", stems=np.array([f"a{fold}", f"b{fold}"]), probs=probs, masks=fold_masks
        )
        explain = {"mean_std": {"energy_inside": {"mean": 0.5 + fold / 10, "std": 0.1, "n": 2}}}
        (run / f"fold_{fold}" / "metrics.json").write_text(json.dumps({"auc_exact": 0.9, "explainability": explain}))
        (run / f"fold_{fold}" / "history.json").write_text(json.dumps([{"epoch": 1, "seconds": 10.0 + fold}]))
    (run / "config.json").write_text(json.dumps({"run": {"train": {"recipe": "hand"}}, "data": "x"}))
    summary = summarize_run(run, elapsed_s=12.34, wall_time_s=56.78, paused_s=9.0)

    written = (run / "summary.json").read_text()
    assert written == json_text(summary.to_json()) + "\n"
    record = json.loads(written)
    assert set(record) == {
        "polypseg_version", "run", "recipe", "data", "n_images", "folds", "folds_planned", "threshold",
        "threshold_selection", "per_fold", "mean_std", "pooled", "paper", "auc_exact", "explainability",
        "wall_time_s", "last_invocation_s", "paused_s",
    }  # fmt: skip
    assert set(record["per_fold"][0]) == {
        "fold", "n_test", "at_0.5", "at_chosen", "crossfit_threshold", "at_crossfit", "training", "auc_exact",
        "explainability",
    }  # fmt: skip
    assert set(record["mean_std"]) == {"at_0.5", "at_chosen", "at_crossfit"}
    assert record["per_fold"][1]["at_0.5"]["sensitivity"] is None  # NaN is written as null
    again = CVSummary.from_json(record)
    assert json_text(again.to_json()) + "\n" == written
    assert np.isnan(again.per_fold[1].at_0_5["sensitivity"]) and again.per_fold[0].training.epochs == 1


def test_cv_prints_held_out_figures_first_and_labels_the_chosen_threshold(tmp_path, monkeypatch):
    """The first result line was the Dice at the threshold chosen on the same out-of-fold predictions."""
    from typer.testing import CliRunner

    from polypseg.cli.main import app
    from polypseg.core.io_utils import read_json
    from polypseg.experiments import cv
    from polypseg.reporting.summary import CVSummary

    record = Path(__file__).parents[1] / "docs" / "runs" / "paper-5fold-cpu" / "summary.json"
    summary = CVSummary.from_json(read_json(record))
    monkeypatch.setattr(cv, "run_cv", lambda *a, **k: summary)
    result = CliRunner().invoke(app, ["cv", "--recipe", "demo", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Dice")]
    fixed = summary.mean_std.at_0_5["dice"][0]
    assert lines[0].startswith(f"Dice {fixed:.4f} ± ") and lines[0].endswith("at threshold 0.5")
    assert lines[-1].endswith("chosen on these same out-of-fold predictions (slightly optimistic)")
    assert f"at threshold {summary.threshold:g}, chosen" in lines[-1]
