"""Shipped models: fp16 release of a checkpoint, registry with SHA-256, verified loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from polypseg.models import pretrained
from polypseg.models.checkpoint import load_checkpoint
from polypseg.models.pretrained import PretrainedError, available_models, get_model, release_model, resolve_model
from polypseg.training.evaluation import predict_probabilities


@pytest.fixture
def released(tiny_cv_run, tmp_path):
    release = {"training_command": "polypseg train ...", "data": {"trained_on": "tiny"}, "test_metrics": {"dice": 0.5}}
    model = release_model(
        tiny_cv_run / "fold_0" / "best", "tiny-model", release, weights_dir=tmp_path, summary="a tiny model"
    )
    return model, tmp_path


def test_release_writes_fp16_weights_and_a_registry_with_sha256(released, tiny_cv_run):
    model, weights_dir = released
    registry = json.loads((weights_dir / "models.json").read_text())["models"]
    assert registry["tiny-model"]["file"] == "tiny-model.safetensors"
    assert registry["tiny-model"]["sha256"] == model.sha256 and len(model.sha256) == 64
    with safe_open(str(model.weights), "pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert model.release()["training_command"] == "polypseg train ..."
    assert model.release()["dtype"] == "float16"
    assert [m.name for m in available_models(weights_dir)] == ["tiny-model"]


def test_shipped_fp16_model_predicts_like_the_fp32_checkpoint(released, tiny_cv_run):
    model, _ = released
    original = load_checkpoint(tiny_cv_run / "fold_0" / "best")
    shipped = load_checkpoint(model.stem)
    assert all(p.dtype == torch.float32 for p in shipped.model.parameters())
    images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = predict_probabilities(original.model, images, precision="fp32")
    b = predict_probabilities(shipped.model, images, precision="fp32")
    # fp16 rounding of the weights (relative 5e-4) moves a probability by ~1e-4 on average; a pixel
    # near 0.5 on a steep sigmoid can move ~0.01, so the bound on the worst pixel is looser.
    assert (a - b).abs().mean() < 1e-3 and (a - b).abs().max() < 5e-2


def test_a_damaged_or_unknown_model_is_refused_by_name(released):
    model, weights_dir = released
    with pytest.raises(PretrainedError, match="no shipped model named 'nope'"):
        get_model("nope", weights_dir)
    data = bytearray(model.weights.read_bytes())
    data[-10] ^= 0xFF
    model.weights.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="tiny-model.*SHA-256"):
        get_model("tiny-model", weights_dir)
    model.weights.unlink()
    with pytest.raises(PretrainedError, match="missing"):
        get_model("tiny-model", weights_dir)


def test_resolve_model_prefers_existing_paths_then_shipped_names(released, tiny_cv_run, monkeypatch):
    model, weights_dir = released
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", weights_dir)
    monkeypatch.setattr(pretrained, "DEFAULT_MODEL", "tiny-model")
    assert resolve_model(None) == model.stem
    assert resolve_model("tiny-model") == model.stem
    assert resolve_model(tiny_cv_run) == tiny_cv_run
    assert resolve_model("no/such/path") == pretrained.Path("no/such/path")


def test_the_bundled_registry_is_consistent():
    """Every model the package ships is listed with the SHA-256 of its file."""
    for model in available_models():
        assert get_model(model.name).sha256 == model.sha256


def _torchscript_exporter(monkeypatch) -> None:
    """The torch.export-based exporter is covered in test_export.py; the TorchScript one is quicker."""
    import functools

    from polypseg.inference import export

    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))


@pytest.fixture
def shipped(released, monkeypatch):
    """The tiny released model stands in for the shipped one."""
    model, weights_dir = released
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", weights_dir)
    monkeypatch.setattr(pretrained, "DEFAULT_MODEL", "tiny-model")
    return model


def test_without_model_or_inputs_explain_runs_the_shipped_model_on_the_bundled_sample(shipped, tmp_path, monkeypatch):
    """The bundled sample stands in as its first 3 pairs: a panel per image is most of explain's time,
    and the sample's 40 pairs are checked by tests/test_data.py."""
    import shutil

    from typer.testing import CliRunner

    from polypseg.cli.main import app
    from polypseg.data import sample_data

    bundled = sample_data.sample_dataset_path()
    sample = tmp_path / "sample"
    for folder, pattern in (("images", "*.jpg"), ("masks", "*.png")):
        (sample / folder).mkdir(parents=True)
        for path in sorted((bundled / folder).glob(pattern))[:3]:
            shutil.copy(path, sample / folder)
    monkeypatch.setattr(sample_data, "sample_dataset_path", lambda: sample)

    out = tmp_path / "first-look"
    result = CliRunner().invoke(app, ["explain", "--out", str(out), "--deletion-steps", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explained"] == 3 and summary["with_ground_truth"] == 3
    explained = [row.split(",")[0] for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert sorted(explained) == sorted(path.stem for path in (sample / "images").iterdir())
    assert summary["checkpoint"] == str(shipped.weights)
    assert (out / "gallery.html").is_file()
    assert "mean Dice" in result.output and "gallery" in result.output


def test_predictor_and_predict_default_to_the_shipped_model(shipped, tmp_path):
    from typer.testing import CliRunner

    from polypseg.cli.main import app
    from polypseg.data.sample_data import sample_dataset_path
    from polypseg.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(device="cpu", backend="torch")
    image = next((sample_dataset_path() / "images").glob("*.jpg"))
    assert predictor.predict_one(image).mask.shape[:2] == predictor.predict_one(image).probability.shape[:2]
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        app, ["predict", str(image), "--out", str(out), "--backend", "torch", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "predictions.csv").is_file()


def test_bench_takes_a_shipped_models_name_on_every_backend(shipped, tmp_path, monkeypatch):
    """The int8 path quantizes the shipped checkpoint itself, found by name like torch's and onnxruntime's."""
    from polypseg.experiments.bench import load_for_bench

    _torchscript_exporter(monkeypatch)

    for backend in ("torch", "onnxruntime-int8"):
        predictor = load_for_bench("tiny-model", backend, device="cpu", workdir=tmp_path)
        assert predictor.backend == ("torch" if backend == "torch" else "onnxruntime")
    assert list(tmp_path.glob("*.int8.onnx"))


def test_models_command_lists_and_verifies(shipped):
    from typer.testing import CliRunner

    from polypseg.cli.main import app

    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["name"] == "tiny-model" and row["sha256_check"] == "verified"
    listing = CliRunner().invoke(app, ["models"])
    assert listing.exit_code == 0 and "[verified]" in listing.output  # data, not a rich style tag
    shipped.weights.write_bytes(shipped.weights.read_bytes()[:-5] + b"xxxxx")
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 1 and "FAILED" in result.output
    as_json = CliRunner().invoke(app, ["models", "--json"])  # the same verdict for a script
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)[0]["sha256_check"].startswith("FAILED")


def test_export_takes_a_shipped_model_by_name_and_asks_where_to_write(tmp_path, monkeypatch):
    """The shipped model's folder is the package's: export writes only where --out says.

    A random 32 px model released into a stand-in weights folder: exporting the real one costs
    seconds of tracing and checks nothing more."""
    from polypseg.inference.deploy import export_checkpoints
    from polypseg.inference.export import ExportError

    from helpers import save_tiny_checkpoint

    _torchscript_exporter(monkeypatch)
    save_tiny_checkpoint(tmp_path / "trained")
    weights_dir = tmp_path / "weights"
    release_model(tmp_path / "trained" / "best", "tiny-model", {"training_command": "-"}, weights_dir=weights_dir)
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", weights_dir)
    with pytest.raises(ExportError, match="--out: tiny-model.* is a shipped model"):
        export_checkpoints("tiny-model")
    assert sorted(path.name for path in weights_dir.iterdir()) == [
        "models.json",
        "tiny-model.json",
        "tiny-model.safetensors",
    ]
    results = export_checkpoints("tiny-model", out=tmp_path / "m.onnx", progress=False)
    assert (tmp_path / "m.onnx").is_file() and len(results) == 1


def test_replacing_a_shipped_model_keeps_the_earlier_release_restorable(released, tiny_cv_run):
    first, weights_dir = released
    release = {"training_command": "polypseg train ... (stage 2)"}
    with pytest.raises(PretrainedError, match="'tiny-model' is already shipped: pass replaces"):
        release_model(tiny_cv_run / "fold_1" / "best", "tiny-model", release, weights_dir=weights_dir)
    second = release_model(
        tiny_cv_run / "fold_1" / "best",
        "tiny-model",
        release,
        weights_dir=weights_dir,
        summary="the second",
        replaces=("abc123", "src/polypseg/models/weights/tiny-model.safetensors"),
    )
    assert second.sha256 != first.sha256
    (earlier,) = second.earlier
    assert (earlier.sha256, earlier.commit, earlier.summary) == (first.sha256, "abc123", "a tiny model")
    assert earlier.restore_command("old.safetensors") == (
        "git show abc123:src/polypseg/models/weights/tiny-model.safetensors > old.safetensors"
    )
    third = release_model(
        tiny_cv_run / "fold_0" / "best", "tiny-model", release, weights_dir=weights_dir, replaces=("def456", "p")
    )
    assert [e.commit for e in third.earlier] == ["def456", "abc123"]  # newest first, none lost


def test_the_shipped_models_earlier_releases_are_in_this_repositorys_history():
    """Each earlier release's commit and path give back a file with its recorded SHA-256 (needs git history)."""
    import hashlib
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    earlier = [e for m in available_models() for e in m.earlier]
    assert earlier, "the shipped model replaced an earlier release: the registry must name it"
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for release in earlier:
        present = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{release.commit}^{{commit}}"])
        if present.returncode != 0:
            pytest.skip(f"commit {release.commit[:10]} is not in this clone's history (shallow clone?)")
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{release.commit}:{release.path}"], capture_output=True
        )
        assert shown.returncode == 0, shown.stderr.decode()
        assert hashlib.sha256(shown.stdout).hexdigest() == release.sha256
        assert len(shown.stdout) == release.size_bytes
