"""The run-folder layout (polypseg.core.runs), config loading and validation, on tiny hand-built folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from polypseg.core.config import ConfigError
from polypseg.core.io_utils import atomic_write_json, read_json
from polypseg.core.recipes import get_recipe
from polypseg.core.runs import CV, TRAIN, RunDir, RunError, RunSettings, fold_name, parse_fold_name
from polypseg.data.splits import inner_validation_split

DOCS_RUNS = Path(__file__).resolve().parents[1] / "docs" / "runs"


def _write_fold(run: Path, fold: int, stems: list[str], size: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + fold)
    probs = rng.integers(0, 256, size=(len(stems), size, size), dtype=np.uint8)
    masks = (rng.random((len(stems), size, size)) > 0.5).astype(np.uint8)
    RunDir(run).write_oof(fold, stems, probs, masks)
    return probs, masks


def test_fold_names_round_trip_and_other_names_are_not_folds() -> None:
    assert fold_name(3) == "fold_3" and parse_fold_name("fold_3") == 3 and parse_fold_name(fold_name(12)) == 12
    for name in ("fold_", "fold_x", "fold_1_old", "fold-1", "folds", "best", "fold_²", "fold_-1"):
        assert parse_fold_name(name) is None, name


def test_layout_of_a_cv_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.config_path == tmp_path / "config.json" and run.splits_path == tmp_path / "splits.json"
    assert run.summary_path == tmp_path / "summary.json" and run.summary_md_path == tmp_path / "summary.md"
    assert run.fold_dir(2) == tmp_path / "fold_2" and run.oof_path(2) == tmp_path / "fold_2" / "oof.npz"
    assert run.fold_metrics_path(0) == tmp_path / "fold_0" / "metrics.json"
    assert run.best_checkpoint(1) == tmp_path / "fold_1" / "best" and run.best_checkpoint() == tmp_path / "best"
    assert run.history_path(1) == tmp_path / "fold_1" / "history.json"
    assert Path(run) == tmp_path and run == RunDir(str(tmp_path))
    # folds sort numerically; started folds have a folder, finished ones their oof.npz; strays are ignored
    for name in ("fold_10", "fold_2", "fold_x", "figures"):
        (tmp_path / name).mkdir()
    (tmp_path / "fold_3").write_text("a file, not a fold")
    _write_fold(tmp_path, 10, ["a"])
    _write_fold(tmp_path, 0, ["b"])
    assert run.fold_indices() == [0, 2, 10] and run.finished_folds() == [0, 10]
    assert RunDir(tmp_path / "absent").fold_indices() == []


def test_the_record_of_a_run_is_its_small_text_files_and_nothing_else(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    kept = [
        "config.json",
        "splits.json",
        "summary.md",
        "external_cvc.json",
        "fold_0/history.json",
        "fold_0/best.json",
        "fold_0/metrics.json",
        "fold_1/history.json",
    ]
    dropped = [
        "fold_0/best.safetensors",
        "fold_0/oof.npz",
        "fold_1/last_state.json",
        "fold_1/last_state.safetensors",
        "report.html",
        "figures/curve.png",
        "figures/notes.json",
        "fold_x/history.json",
    ]
    for name in kept + dropped:
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        (run.path / name).write_text(name)
    assert sorted(str(p.relative_to(run.path)) for p in run.record_files()) == sorted(kept)
    copies = run.copy_record(tmp_path / "docs")
    assert sorted(str(p.relative_to(tmp_path / "docs")) for p in copies) == sorted(kept)
    assert (tmp_path / "docs" / "fold_0" / "best.json").read_text() == "fold_0/best.json"


def test_load_oof_pools_finished_folds_in_fold_order(tmp_path: Path) -> None:
    p10, m10 = _write_fold(tmp_path, 10, ["c", "d"])
    p2, m2 = _write_fold(tmp_path, 2, ["a", "b", "e"])
    (tmp_path / "fold_5").mkdir()  # started, not finished
    oof = RunDir(tmp_path).load_oof()
    assert oof.stems == ["a", "b", "e", "c", "d"] and oof.folds == [2, 2, 2, 10, 10]
    np.testing.assert_allclose(oof.probs.numpy(), np.concatenate([p2, p10]).astype(np.float32) / 255)
    np.testing.assert_array_equal(oof.masks.numpy(), np.concatenate([m2, m10]))
    stems, probs, masks, folds = RunDir(tmp_path).load_oof(folds=[10])  # a tuple, as cv.load_oof always returned
    assert stems == ["c", "d"] and folds == [10, 10] and probs.shape == (2, 4, 4)
    with pytest.raises(RunError, match="fold 5 .* is not finished"):
        RunDir(tmp_path).load_oof(folds=[5])
    with pytest.raises(RunError, match="no out-of-fold predictions"):
        RunDir(tmp_path / "empty").load_oof()


def test_cv_settings_round_trip_in_the_saved_shape(tmp_path: Path) -> None:
    config = get_recipe("demo")
    settings = RunSettings(config=config, kind=CV, data="/data/kvasir", folds=5, seed=3, polypseg_version="1.2.3")
    run = RunDir(tmp_path)
    assert run.saved_settings() is None and not run.has_settings()
    run.write_settings(settings)
    assert set(read_json(run.config_path)) == {"run", "data", "folds", "seed", "polypseg_version"}
    assert run.read_settings() == settings


def test_train_settings_are_a_bare_run_config_byte_for_byte(tmp_path: Path) -> None:
    config = get_recipe("cpu")
    RunDir(tmp_path).write_settings(RunSettings(config=config, kind=TRAIN))
    config.save(tmp_path / "expected.json")
    assert (tmp_path / "config.json").read_bytes() == (tmp_path / "expected.json").read_bytes()
    loaded = RunDir(tmp_path).read_settings()
    assert loaded.kind == TRAIN and loaded.config == config and loaded.data is None


@pytest.mark.parametrize("folder", sorted(p.name for p in DOCS_RUNS.iterdir() if (p / "config.json").is_file()))
def test_real_old_runs_in_docs_load_and_save_unchanged(folder: str, tmp_path: Path) -> None:
    run = RunDir(DOCS_RUNS / folder)
    settings = run.read_settings()
    copy = RunDir(tmp_path)
    copy.write_settings(settings)
    assert read_json(copy.config_path) == read_json(run.config_path)
    if settings.kind == TRAIN:
        assert copy.config_path.read_bytes() == run.config_path.read_bytes()
        split = run.read_split()
        assert split is not None and {"train", "val", "test"} <= set(split)


def test_the_shipped_run_split_is_what_the_one_split_function_draws() -> None:
    """Runs saved before the split was one function keep their split: the function redraws it exactly."""
    run = RunDir(DOCS_RUNS / "kvasir-unet-r34")
    split, config = run.read_split(), run.read_settings().config
    assert split is not None
    train, val = inner_validation_split(split["train"] + split["val"], config.train.val_fraction, config.train.seed)
    assert (train, val) == (split["train"], split["val"])


def test_old_config_formats_load(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    # a CV run from before polypseg_version was recorded, whose train section had `amp` and `thresholds`
    old_train = {k: v for k, v in get_recipe("paper").to_dict()["train"].items() if k != "precision"}
    old_train.update(amp=False, thresholds=[0.3, 0.35, 0.4])
    atomic_write_json(
        run.config_path, {"run": {"model": {"arch": "unet"}, "train": old_train}, "data": "/d", "folds": 5, "seed": 0}
    )
    settings = run.read_settings()
    assert settings.kind == CV and settings.polypseg_version is None and settings.folds == 5
    assert settings.config.train.precision == "fp32" and not hasattr(settings.config.train, "thresholds")
    # a bare train config with only some fields
    atomic_write_json(run.config_path, {"train": {"epochs": 7, "amp": True}})
    settings = run.read_settings()
    assert settings.kind == TRAIN and settings.config.train.epochs == 7 and settings.config.train.precision == "auto"


def test_unreadable_config_is_one_user_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(RunError, match="no config.json"):
        run.read_settings()
    run.config_path.write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        run.read_settings()
    run.config_path.write_text("{}")
    with pytest.raises(RunError, match="neither a CV run"):
        run.read_settings()
    run.config_path.write_text(json.dumps({"run": {"train": {"bogus": 1}}}))
    with pytest.raises(ConfigError, match="bogus"):
        run.read_settings()


def test_summary_and_histograms_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_summary() is None and run.read_pooled_histograms() is None
    run.write_summary({"threshold": 0.45}, "# summary\n")
    run.write_pooled_histograms(np.arange(3), np.arange(3, 6))
    assert run.read_summary() == {"threshold": 0.45} and run.summary_md_path.read_text() == "# summary\n"
    positive, negative = run.read_pooled_histograms()
    assert positive.tolist() == [0, 1, 2] and negative.tolist() == [3, 4, 5]


def test_inner_validation_split_is_seeded_sorted_and_disjoint() -> None:
    stems = [f"s{i:02d}" for i in range(20)]
    train, val = inner_validation_split(list(reversed(stems)), 0.25, seed=1, fold=2)
    assert len(val) == 5 and sorted(train + val) == stems and train == sorted(train) and val == sorted(val)
    assert inner_validation_split(stems, 0.25, seed=1, fold=2) == (train, val)
    assert inner_validation_split(stems, 0.25, seed=1, fold=3) != (train, val)
    assert inner_validation_split(stems, 0.0, seed=1) == (stems, [])


def test_report_refuses_a_training_folder_and_writes_nothing_into_it(tmp_path: Path) -> None:
    from polypseg.reporting import ReportError, write_report

    run = tmp_path / "ship"
    shutil.copytree(DOCS_RUNS / "kvasir-unet-r34", run)
    _write_fold(run, 0, ["a"])
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(ReportError, match="single-split training folder"):
        write_report(run)
    assert sorted(p.name for p in run.rglob("*")) == before
    # as it is (no fold_*): the same words as compare's, not "no finished fold yet" (which suggests waiting)
    plain = shutil.copytree(DOCS_RUNS / "kvasir-unet-r34", tmp_path / "plain")
    with pytest.raises(ReportError, match="is a single-split training folder, not a CV run folder$"):
        write_report(plain)


def test_reporting_reads_runs_without_importing_the_training_side() -> None:
    """cv -> reporting only (the report is written after a run): reporting never imports cv or training."""
    import ast

    import polypseg

    package = Path(polypseg.__file__).parent
    for path in [*sorted((package / "reporting").glob("*.py")), package / "core" / "runs.py"]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        assert not imported & {
            "polypseg.experiments.cv",
            "polypseg.training.loop",
            "polypseg.training.train_split",
            "polypseg.experiments.studies",
        }, path.name


def test_single_split_resumes_on_its_saved_split_and_evaluates_as_the_recipe_says(tmp_path: Path, monkeypatch) -> None:
    from polypseg.training import loop as training
    from polypseg.training.train_split import train_single_split

    from helpers import tiny_config, write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n=10)
    test_list = tmp_path / "test.txt"
    test_list.write_text("case00\ncase01\n")
    config = tiny_config(image_size=32)
    config.train.val_fraction = 0.25
    calls: list[int] = []
    predict = training.predict_probabilities
    monkeypatch.setattr(
        training, "predict_probabilities", lambda *a, **k: calls.append(k.get("batch_size")) or predict(*a, **k)
    )
    kwargs = dict(device="cpu", progress=False, cache_dir=tmp_path / "cache")
    out = tmp_path / "run"
    train_single_split(data, out, config, test_list=test_list, **kwargs)
    assert calls[-1] == config.train.eval_batch_size  # the test set, predicted with the recipe's batch size
    run = RunDir(out)
    assert run.read_settings().kind == TRAIN
    split = run.read_split()
    assert split is not None and split["test"] == ["case00", "case01"] and len(split["val"]) == 2
    # a saved split is read back, never redrawn (here: a hand-edited one survives a resume)
    split["train"], split["val"] = split["train"][1:], sorted(split["val"] + split["train"][:1])
    run.write_split(split)
    train_single_split(data, out, config, resume=True, **kwargs)  # without --test-list: the run's own test stems
    assert run.read_split() == split
    result = train_single_split(data, out, config, test_list=test_list, resume=True, **kwargs)
    assert run.read_split() == split and result["test"]["n_images"] == 2
    other = tmp_path / "other.txt"
    other.write_text("case02\n")
    with pytest.raises(RunError, match="other test stems"):
        train_single_split(data, out, config, test_list=other, resume=True, **kwargs)
    with pytest.raises(RunError, match="--resume"):
        train_single_split(data, out, config, test_list=test_list, **kwargs)
    # resuming reads the run's own data: the bundled sample (what an omitted --data becomes) stands for it,
    # and other data under the same file names is refused by name
    from polypseg.data.sample_data import sample_dataset_path

    assert train_single_split(sample_dataset_path(), out, config, resume=True, **kwargs)["test"]["n_images"] == 2
    changed = write_synthetic_dataset(tmp_path / "changed", n=10, seed=5)
    with pytest.raises(RunError, match="data: "):
        train_single_split(changed, out, config, resume=True, **kwargs)
