"""One threshold rule for predict, explain and export: however one fold of a CV run is named, it gets the
threshold cross-validation chose for the run (its ``summary.json``); an explicit threshold still wins."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import copy_into_folds

RUN_THRESHOLD = 0.7  # the tiny checkpoint's own is 0.5


@pytest.fixture()
def run(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A 2-fold CV run folder of copies of the tiny checkpoint whose summary chose threshold 0.7."""
    root = copy_into_folds(tiny_checkpoint, tmp_path / "run")
    (root / "summary.json").write_text(json.dumps({"threshold": RUN_THRESHOLD}))
    return root


def _names_of_fold_0(run: Path) -> list[tuple[Path, int | None]]:
    return [
        (run, 0),
        (run / "fold_0", None),
        (run / "fold_0" / "best", None),
        (run / "fold_0" / "best.safetensors", None),
    ]


def test_every_name_of_a_fold_resolves_to_the_runs_threshold(run: Path) -> None:
    from polypseg.inference.loading import resolve_source, run_folder_of
    from polypseg.inference.predictor import Predictor

    for path, fold in _names_of_fold_0(run):
        assert run_folder_of(path) == run, path
        assert resolve_source(path, fold=fold).threshold == RUN_THRESHOLD, path
        assert resolve_source(path, fold=fold, threshold=0.3).threshold == 0.3, path
    assert Predictor.from_checkpoint(run / "fold_0", device="cpu", backend="torch").threshold == RUN_THRESHOLD


def test_a_lone_checkpoint_keeps_its_own_threshold(tiny_checkpoint: Path) -> None:
    from polypseg.inference.loading import resolve_source, run_folder_of

    assert run_folder_of(tiny_checkpoint) is None
    assert resolve_source(tiny_checkpoint).threshold == 0.5


def test_a_bad_run_threshold_is_refused_for_a_fold_too(run: Path) -> None:
    from polypseg.inference.loading import PredictorError, resolve_source

    (run / "summary.json").write_text(json.dumps({"threshold": 5}))
    with pytest.raises(PredictorError, match="summary.json"):
        resolve_source(run / "fold_0")


@pytest.mark.parametrize("named", ["run", "fold folder"])
def test_explain_uses_the_runs_threshold(named: str, run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from polypseg.cli.main import app

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    model = ["--model", str(run), "--fold", "0"] if named == "run" else ["--model", str(run / "fold_0")]
    out = tmp_path / "out"
    args = [
        "explain",
        str(image),
        *model,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--deletion-steps",
        "0",
        "--no-gallery",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["settings"]["threshold"] == RUN_THRESHOLD


def test_export_writes_the_runs_threshold_into_a_folds_sidecar(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polypseg.inference import deploy, export

    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    [result] = deploy.export_checkpoints(run / "fold_0" / "best", out=tmp_path / "fold0.onnx")
    assert export.read_onnx_metadata(Path(result["onnx"]))["threshold"] == RUN_THRESHOLD
