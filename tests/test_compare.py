from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from polypseg.cli.common import UsageError
from polypseg.cli.main import app
from polypseg.core.io_utils import atomic_write_json, read_json
from polypseg.reporting.compare import CompareError, compare_runs, min_wilcoxon_p, paired_test
from polypseg.reporting.compare import test_notes as fold_notes


@pytest.fixture(scope="module")
def second_run(tiny_cv_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second run on the same folds: ``tiny_cv_run`` with its out-of-fold probabilities sharpened
    (p -> p**0.7, as a differently trained model would differ) and its summary recomputed by cv's own code.

    compare only reads splits, config and out-of-fold predictions, so this stands in for a second
    training at a fraction of the CPU time.
    """
    from polypseg.experiments.cv import summarize_run

    run = tmp_path_factory.mktemp("second") / "seed1"
    shutil.copytree(tiny_cv_run, run, ignore=shutil.ignore_patterns("*.safetensors", "figures", "report.html"))
    for path in run.glob("fold_*/oof.npz"):
        with np.load(path) as data:
            payload = {key: data[key] for key in data.files}
        payload["probs"] = np.round(255 * (payload["probs"] / 255.0) ** 0.7).astype(np.uint8)
        np.savez_compressed(path, **payload)
    summarize_run(run)
    return run


def test_runs_share_splits_and_metrics_match_their_summaries(tiny_cv_run: Path, second_run: Path) -> None:
    assert read_json(tiny_cv_run / "splits.json") == read_json(second_run / "splits.json")
    comparison = compare_runs([tiny_cv_run, second_run])
    assert [r.name for r in comparison.runs] == ["run", "seed1"]
    for run, metrics in zip((tiny_cv_run, second_run), comparison.runs, strict=False):
        summary = read_json(run / "summary.json")
        for metric in ("dice", "iou", "auc", "sensitivity", "precision"):
            expected = [f["at_0.5"][metric] for f in summary["per_fold"]]
            np.testing.assert_allclose(metrics.values[metric], expected, rtol=1e-9)
        assert all(0.0 <= v <= 1.0 for v in metrics.values["boundary_f1"])


def test_paired_tests_match_scipy(tiny_cv_run: Path, second_run: Path) -> None:
    comparison = compare_runs([tiny_cv_run, second_run])
    a = [f["at_0.5"]["dice"] for f in read_json(tiny_cv_run / "summary.json")["per_fold"]]
    b = [f["at_0.5"]["dice"] for f in read_json(second_run / "summary.json")["per_fold"]]
    test = comparison.tests["seed1"]["dice"]
    np.testing.assert_allclose(test.differences, np.subtract(b, a), rtol=1e-9)
    assert test.t_p == pytest.approx(stats.ttest_rel(b, a).pvalue)
    # two folds: the exact test can only give 0.5 (both differences of one sign) or 1.0 (mixed signs)
    expected = stats.wilcoxon(b, a, method="exact").pvalue
    assert expected in (0.5, 1.0) and test.wilcoxon_p == pytest.approx(expected)
    assert test.corrected_t_p >= test.t_p  # the corrected test is never more confident
    # its variance factor uses the real n_test/n_train (inner-validation images are not training images)
    folds = read_json(tiny_cv_run / "splits.json")["folds"]
    n_test, n_train = (sum(len(f[key]) for f in folds) for key in ("test", "train"))
    d = np.subtract(b, a)
    t_corrected = d.mean() / np.sqrt((1 / 2 + n_test / n_train) * d.var(ddof=1))
    assert test.corrected_t_p == pytest.approx(2 * stats.t.sf(abs(t_corrected), df=1))


def test_chosen_threshold_uses_each_runs_own(tiny_cv_run: Path, second_run: Path) -> None:
    comparison = compare_runs([tiny_cv_run, second_run], threshold="chosen")
    for run, metrics in zip((tiny_cv_run, second_run), comparison.runs, strict=False):
        summary = read_json(run / "summary.json")
        assert metrics.threshold == summary["threshold"]
        np.testing.assert_allclose(
            metrics.values["dice"], [f["at_chosen"]["dice"] for f in summary["per_fold"]], rtol=1e-9
        )


def test_compare_cli_prints_and_writes_the_table(tiny_cv_run: Path, second_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp.md"
    result = CliRunner().invoke(
        app, ["compare", str(tiny_cv_run), str(second_run), "--metric", "dice", "--metric", "bf1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| run | Dice | IoU | Boundary F1 |" in text
    assert "## Paired test across folds: Dice" in text and "## Paired test across folds: Boundary F1" in text
    assert "| Δ seed1 − run |" in text
    assert "2/2^2 = 0.5" in text
    data = read_json(tmp_path / "cmp.json")
    a, b = (
        [f["at_0.5"]["dice"] for f in read_json(run / "summary.json")["per_fold"]] for run in (tiny_cv_run, second_run)
    )
    assert data["paired_tests"]["seed1"]["dice"]["wilcoxon_p"] == pytest.approx(
        stats.wilcoxon(b, a, method="exact").pvalue
    )
    assert "Paired test across folds: Dice" in result.stdout


def test_different_splits_are_refused(tiny_cv_run: Path, second_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(second_run, other)
    splits = read_json(other / "splits.json")
    a, b = splits["folds"][0]["test"][0], splits["folds"][1]["test"][0]
    splits["folds"][0]["test"][0], splits["folds"][1]["test"][0] = b, a
    atomic_write_json(other / "splits.json", splits)
    with pytest.raises(CompareError, match="fold 0 test sets differ") as info:
        compare_runs([tiny_cv_run, other])
    assert str(tiny_cv_run) in str(info.value) and str(other) in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_arguments(tiny_cv_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="at least two"):
        compare_runs([tiny_cv_run])
    with pytest.raises(CompareError, match="no config.json"):
        compare_runs([tiny_cv_run, tmp_path])
    result = CliRunner().invoke(app, ["compare", str(tiny_cv_run), str(tiny_cv_run), "--metric", "hausdorff"])
    assert isinstance(result.exception, UsageError) and "--metric hausdorff" in str(result.exception)
    result = CliRunner().invoke(app, ["compare", str(tiny_cv_run), str(tiny_cv_run), "--threshold", "1.5"])
    assert isinstance(result.exception, UsageError)


def test_a_run_against_itself_differs_by_nothing(tiny_cv_run: Path) -> None:
    comparison = compare_runs([tiny_cv_run, tiny_cv_run])
    name = comparison.runs[1].name
    test = comparison.tests[name]["dice"]
    assert test.differences == [0.0, 0.0] and test.t_p == 1.0 and test.wilcoxon_p == 1.0


def test_paired_test_on_known_values() -> None:
    reference = [0.80, 0.82, 0.79, 0.85, 0.81]
    other = [0.84, 0.85, 0.80, 0.88, 0.86]
    test = paired_test("dice", reference, other, test_share=0.2)
    assert test.better == 5
    assert test.mean == pytest.approx(0.032)
    assert test.wilcoxon_p == pytest.approx(0.0625)  # 5/5 better: the smallest p five folds allow
    assert test.t_p == pytest.approx(stats.ttest_rel(other, reference).pvalue)
    d = np.subtract(other, reference)
    t_corrected = d.mean() / np.sqrt((1 / 5 + 0.2 / 0.8) * d.var(ddof=1))
    assert test.corrected_t_p == pytest.approx(2 * stats.t.sf(abs(t_corrected), df=4))
    assert min_wilcoxon_p(5) == 0.0625


def test_a_record_without_predictions_compares_from_its_fold_metrics(
    tiny_cv_run: Path, second_run: Path, tmp_path: Path
) -> None:
    """docs/runs/ records keep metrics.json but not oof.npz: the same numbers, boundary F1 n/a."""
    record = tmp_path / "record"
    shutil.copytree(tiny_cv_run, record, ignore=shutil.ignore_patterns("*.safetensors", "*.npz", "figures", "*.html"))
    full = compare_runs([tiny_cv_run, second_run])
    from_record = compare_runs([record, second_run])
    assert from_record.runs[0].recorded_folds == [0, 1] and full.runs[0].recorded_folds == []
    for metric in ("dice", "iou", "auc", "sensitivity", "precision"):
        np.testing.assert_allclose(from_record.runs[0].values[metric], full.runs[0].values[metric], rtol=1e-9)
        assert from_record.tests["seed1"][metric].mean == pytest.approx(full.tests["seed1"][metric].mean)
    assert all(np.isnan(from_record.runs[0].values["boundary_f1"]))
    assert from_record.to_dict()["paired_tests"]["seed1"]["boundary_f1"]["t_p"] is None
    text = from_record.to_markdown(metrics=("dice",))
    assert "Read from recorded fold metrics" in text and "`record`" in text
    chosen = compare_runs([record, second_run], threshold="chosen")
    assert chosen.runs[0].threshold == read_json(tiny_cv_run / "summary.json")["threshold"]
    with pytest.raises(CompareError, match=r"recorded metrics have no threshold 0.52"):
        compare_runs([record, second_run], threshold=0.52)


def test_notes_for_one_fold_say_no_test_is_possible() -> None:
    (note,) = fold_notes(1)
    assert "no paired test across folds is possible" in note and "1 folds" not in note
    assert fold_notes(5)[0].startswith("Notes. With 5 folds")
