from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from polypseg.cli.main import app
from polypseg.core.io_utils import read_json
from polypseg.experiments.cv import load_oof
from polypseg.metrics.segmentation import dice_score
from polypseg.reporting import ReportError, write_report

SECTIONS = ("summary", "curves", "threshold", "roc", "folds", "explainability", "worst", "notes")
FIGURES = ("training_curves", "threshold_sweep", "roc_pr", "fold_boxplots", "gradcam_gallery", "worst_cases")


@pytest.fixture(scope="module")
def report(tiny_cv_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny run copied, then reported through the CLI (``polypseg report RUN``)."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_cv_run, run)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    return run, (run / "report.html").read_text()


def test_report_has_every_section_and_figure(report: tuple[Path, str]) -> None:
    run, html = report
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    for name in FIGURES:
        path = run / "figures" / f"{name}.png"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == len(FIGURES)
    assert embedded[FIGURES.index("roc_pr")] and len(set(embedded)) == len(FIGURES)


def test_report_is_self_contained(report: tuple[Path, str]) -> None:
    _, html = report
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'src="(?!data:)', html)  # every image is embedded


def test_report_numbers_match_the_run(report: tuple[Path, str]) -> None:
    run, html = report
    summary = read_json(run / "summary.json")
    t = summary["threshold"]
    dice, std = summary["mean_std"]["at_chosen"]["dice"]
    assert f"ours @ {t:g} (chosen on these predictions)" in html
    assert (
        "ours @ each fold&#x27;s threshold chosen on the other folds" in html
        or "threshold chosen on the other folds" in html
    )
    assert f"{dice:.4f} ± {std:.4f}" in html
    exact, exact_std = summary["auc_exact"]
    assert f"exact, from each fold's float probabilities before storage: AUC-ROC {exact:.4f} ± {exact_std:.4f}" in html
    # the worst case shown is the lowest per-image Dice at the chosen threshold, computed independently
    # (ties, e.g. several images at Dice 0, broken by name as the report does)
    stems, probs, masks, _ = load_oof(run)
    dices = dice_score(probs >= t, masks).numpy()
    worst = stems[min(range(len(stems)), key=lambda i: (dices[i], stems[i]))]
    worst_rows = re.findall(r'<tr><td>worst</td><td class="text">([^<]+)</td>', html)
    assert worst_rows[0] == worst
    # the explainability table carries the fold means measured during cv
    fold0 = read_json(run / "fold_0" / "metrics.json")["explainability"]["mean_std"]["energy_inside"]["mean"]
    assert f"{fold0:.4f}" in html
    # and says on how many images each fold measured it (2 each: explain_max_images=2)
    counts = [len(read_json(run / f"fold_{k}" / "metrics.json")["explainability"]["per_image"]) for k in (0, 1)]
    assert counts == [2, 2]
    assert "images per fold: 2, 2" in html
    # the run's time, and each fold's median epoch from its history
    medians = [f["training"]["median_epoch_s"] for f in summary["per_fold"]]
    assert "median epoch" in html and ", ".join(f"{m:.0f} s" for m in medians) + " (per fold)" in html


def test_explained_image_count_of_each_fold() -> None:
    from polypseg.reporting.report import _explained_images

    records = [{"stem": "a", "energy_inside": 0.5}, {"stem": "b", "energy_inside": None}]
    assert (
        _explained_images({"per_image": records, "mean_std": {"energy_inside": {"mean": 0.5, "std": 0.0, "n": 1}}}) == 2
    )
    # a summary without its per-image records: the largest per-metric count
    assert _explained_images({"mean_std": {"energy_inside": {"n": 7}, "pointing_game": {"n": 8}}}) == 8
    assert _explained_images({"n_images": 3}) == 3


def test_report_of_a_partial_run(tiny_cv_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_cv_run, run)
    for name in ("oof.npz", "metrics.json"):
        (run / "fold_1" / name).unlink()
    (run / "summary.json").unlink()
    html = write_report(run, n_cases=2, n_worst=2).read_text()
    assert "Partial run" in html
    assert "1 of 2 finished" in html
    # the report is a view: it summarised the finished fold in memory and wrote nothing into the run
    assert not (run / "summary.json").exists()


def test_report_without_the_dataset_shows_cases_without_heatmaps(tiny_cv_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_cv_run, run, ignore=shutil.ignore_patterns("figures", "report.html"))
    config = read_json(run / "config.json")
    config["data"] = str(tmp_path / "moved-away")
    (run / "config.json").write_text(json.dumps(config))
    html = write_report(run, out_html=tmp_path / "elsewhere.html", n_cases=2, n_worst=2).read_text()
    assert "dataset folder unavailable" in html
    assert (tmp_path / "elsewhere.html").is_file() and not (run / "report.html").exists()
    assert (run / "figures" / "worst_cases.png").is_file()


def test_report_of_a_run_trained_from_a_cache_file(tiny_cv_run: Path, tmp_path: Path) -> None:
    from polypseg.data.cache import cache_path
    from polypseg.data.sample_data import sample_dataset_path

    run = tmp_path / "run"
    shutil.copytree(tiny_cv_run, run, ignore=shutil.ignore_patterns("figures", "report.html"))
    config = read_json(run / "config.json")
    config["data"] = str(cache_path(sample_dataset_path(), 64, tiny_cv_run.parent / "cache"))  # as on a GPU machine
    (run / "config.json").write_text(json.dumps(config))
    html = write_report(run, n_cases=2, n_worst=2).read_text()
    assert "unavailable" not in html  # images (and so heatmaps) come from the cache file
    assert "<tr><td>worst</td>" in html


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    from polypseg.core.recipes import get_recipe
    from polypseg.core.runs import CV, RunDir, RunSettings

    with pytest.raises(ReportError, match="no config.json"):
        write_report(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ReportError, match="holds neither a CV run") as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)
    RunDir(tmp_path).write_settings(RunSettings(config=get_recipe("demo"), kind=CV, folds=2, seed=0))
    with pytest.raises(ReportError, match="no finished fold") as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "metrics.json").write_text("{}")  # a committed record: evaluated, no oof.npz
    with pytest.raises(ReportError, match=r"out-of-fold predictions \(fold_\*/oof\.npz\) are not here") as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)


def test_undefined_explanation_means_are_nan_not_a_crash():
    """A fold whose every mask is empty stores its explanation means as null (strict JSON)."""
    import math

    from polypseg.reporting.report import _metric_mean

    assert math.isnan(_metric_mean({"mean": None, "std": None, "n": 0}))
    assert math.isnan(_metric_mean([None, None])) and math.isnan(_metric_mean(None))
    assert _metric_mean({"mean": 0.25}) == 0.25 and _metric_mean([0.5, 0.1]) == 0.5
