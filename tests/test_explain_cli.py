"""``polypseg explain`` end to end on tiny synthetic data, plus gallery selection and rendering."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from polypseg.errors import PolypsegError
from polypseg.explain.gallery import render_gallery, render_panel, select_cases, select_records, write_gallery

from helpers import save_tiny_checkpoint

SIZES = {"a": (40, 48), "b": (36, 36), "c": (52, 30)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[5:20, 8:25] = 255
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (root / "masks" / "broken.png").write_bytes(b"not a png either")
    return root


def _invoke(*args: str) -> object:
    from polypseg.cli.main import app

    return CliRunner().invoke(app, ["explain", *args])


def test_explain_dataset_root(checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke(
        str(dataset), "--model", str(checkpoint), "--out", str(out), "--device", "cpu", "--deletion-steps", "2"
    )
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output  # named ...
    for stem, size in SIZES.items():  # ... and nothing else lost
        heatmap = np.load(out / f"{stem}_heatmap.npy")
        assert heatmap.shape == size and heatmap.dtype == np.float32
        assert 0 <= heatmap.min() and heatmap.max() <= 1
        with Image.open(out / f"{stem}_panel.png") as panel:
            assert panel.format == "PNG" and panel.width > panel.height
    assert not list(out.glob("broken*"))

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["stem"] for r in rows] == ["a", "b", "c"]
    for row in rows:
        assert row["has_ground_truth"] == "True"
        assert 0 <= float(row["dice"]) <= 1
        assert 0 <= float(row["energy_inside"]) <= 1
        assert row["pointing_game"] in ("0", "1")
        assert row["deletion_auc"] != ""

    summary = json.loads((out / "summary.json").read_text())
    assert summary["explained"] == 3
    assert [Path(p).name for p in summary["skipped"]] == ["broken.jpg"]
    assert summary["mean_std"]["dice"]["n"] == 3
    assert summary["settings"]["threshold"] == 0.5 and summary["settings"]["image_size"] == 32

    page = (out / "gallery.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "broken.jpg" in page


def test_batch_size_bounds_the_deletion_passes_too(
    checkpoint: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--batch-size is the memory bound of every pass: the 2 x --deletion-steps perturbed images go in batches of it."""
    from polypseg.explain import metrics

    seen: list[int] = []
    real = metrics.model_logits

    def counting(model, images, *args, **kwargs):
        seen.append(images.shape[0])
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(metrics, "model_logits", counting)
    out = tmp_path / "out"
    result = _invoke(
        str(dataset), "--model", str(checkpoint), "--out", str(out), "--device", "cpu",
        "--deletion-steps", "4", "--batch-size", "2", "--no-gallery",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen and max(seen) == 2  # 3 images x 8 perturbed inputs, two at a time
    assert sum(seen) >= 3 * 2 * 4


def test_no_progress_reaches_explain_files(
    checkpoint: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--progress/--no-progress, as on cv, train, predict and evaluate, decides explain's progress bar."""
    from polypseg.explain import files

    asked: list[bool] = []
    real = files.explain_files

    def recording(*args, **kwargs):
        asked.append(kwargs["progress"])
        return real(*args, **kwargs)

    monkeypatch.setattr(files, "explain_files", recording)
    common = [str(dataset / "images" / "a.png"), "--model", str(checkpoint), "--device", "cpu", "--deletion-steps", "0"]
    for flag, out in (("--no-progress", "quiet"), ("--progress", "bar")):
        result = _invoke(*common, "--out", str(tmp_path / out), "--no-gallery", flag)
        assert result.exit_code == 0, result.output
    assert asked == [False, True]


def test_explain_files_with_masks_png16_no_gallery(checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = [str(dataset / "images" / "a.png"), str(dataset / "images" / "c.png")]
    result = _invoke(
        *files,
        "--model", str(checkpoint.with_suffix("")),
        "--out", str(out),
        "--masks", str(dataset / "masks"),
        "--heatmap-format", "png16",
        "--no-gallery",
        "--deletion-steps", "0",
        "--threshold", "0.4",
        "--layer", "decoder.block3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(out / "a_heatmap.png") as png:
        assert png.mode.startswith("I;16") and png.size == (48, 40)
        levels = np.asarray(png)
    assert levels.max() == 65535 or levels.max() == 0
    assert not (out / "gallery.html").exists()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["stem"] for r in rows] == ["a", "c"] and rows[0]["dice"] != "" and rows[0]["deletion_auc"] == ""
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["threshold"] == 0.4 and settings["layer"] == "decoder.block3"


def test_explain_run_folder_fold_choice_and_user_errors(checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for fold in (0, 1):
        (run / f"fold_{fold}").mkdir(parents=True)
        for suffix in (".safetensors", ".json"):
            (run / f"fold_{fold}" / f"best{suffix}").write_bytes(checkpoint.with_suffix(suffix).read_bytes())
    image = str(dataset / "images" / "b.png")
    out = tmp_path / "out"
    result = _invoke(
        image, "--model", str(run), "--out", str(out), "--fold", "1", "--deletion-steps", "0", "--no-gallery"
    )
    assert result.exit_code == 0, result.output
    assert "fold_1" in json.loads((out / "summary.json").read_text())["checkpoint"]

    bad_fold = _invoke(image, "--model", str(run), "--out", str(out), "--fold", "7")
    assert isinstance(bad_fold.exception, PolypsegError) and "--fold 7" in str(bad_fold.exception)
    bad_layer = _invoke(image, "--model", str(run), "--out", str(out), "--layer", "decoder.block99")
    assert isinstance(bad_layer.exception, PolypsegError) and "--layer decoder.block99" in str(bad_layer.exception)
    missing = _invoke(str(tmp_path / "nope.png"), "--model", str(run), "--out", str(out))
    assert isinstance(missing.exception, PolypsegError) and "nope.png" in str(missing.exception)


# ---------------------------------------------------------------------------------------------
# Gallery


def test_select_records_best_median_worst_without_repeats() -> None:
    records = [{"stem": f"s{i}", "dice": d} for i, d in enumerate([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])]
    groups = select_records(records, per_group=3)
    dice = {name: [r["dice"] for r in group] for name, group in groups.items()}
    assert dice == {"best": [0.9, 0.8, 0.7], "median": [0.6, 0.5, 0.4], "worst": [0.1, 0.2, 0.3]}
    assert list(groups) == ["best", "median", "worst"]

    few = select_records(records[:4], per_group=3)  # 4 records: each shown once, the worst first
    shown = [r["stem"] for group in few.values() for r in group]
    assert sorted(shown) == ["s0", "s1", "s2", "s3"]
    assert [r["dice"] for r in few["worst"]] == [0.1, 0.3, 0.5] and [r["dice"] for r in few["best"]] == [0.9]

    no_truth = select_records([{"stem": "x", "dice": float("nan")}, {"stem": "y"}], per_group=1)
    assert list(no_truth) == ["all"] and [r["stem"] for r in no_truth["all"]] == ["x", "y"]


def test_select_cases_one_rule_for_reports_and_galleries() -> None:
    from polypseg.reporting.cases import select_cases as report_select_cases

    assert report_select_cases is select_cases
    scores = [0.5, 0.5, float("nan"), 0.9, 0.1, 0.5]
    stems = ["c", "a", "nan", "top", "low", "b"]
    picks = select_cases(scores, stems, 1)
    assert picks == {"best": [3], "median": [5], "worst": [4]}
    # ties: of equal scores the smaller stem counts as the lower; NaN never chosen
    assert select_cases([0.5, 0.5, 0.5], ["b", "a", "c"], 1) == {"best": [2], "median": [0], "worst": [1]}
    assert select_cases(scores, stems, 9)["worst"] == [4, 1, 5, 0, 3]
    assert select_cases([], [], 2) == {"best": [], "median": [], "worst": []}


def test_render_panel_and_gallery_page(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    heat = rng.random((30, 40)).astype(np.float32)
    prediction = np.zeros((30, 40), dtype=bool)
    prediction[5:15, 5:20] = True
    with_gt = render_panel(image, heat, prediction, prediction, title="x")
    without_gt = render_panel(image, heat, np.zeros((30, 40), dtype=bool))
    with Image.open(io.BytesIO(with_gt)) as a, Image.open(io.BytesIO(without_gt)) as b:
        assert a.width > b.width  # the ground-truth column is there only when given

    records = [{"stem": "<b>", "dice": 0.5, "energy_inside": float("nan")}]
    page = render_gallery({"best": records}, {"<b>": with_gt}, title="T & T")
    assert "&lt;b&gt;" in page and "<b><b>" not in page and "T &amp; T" in page
    path = write_gallery(tmp_path / "g.html", records, {"<b>": with_gt})
    assert path.read_text().count("data:image/png;base64,") == 1


def test_explain_cvc_tiff_layout(checkpoint: Path, tmp_path: Path, shared_dataset) -> None:
    import shutil

    CVC = shared_dataset("cvc-clinicdb-test62")  # skips only when the shared data are absent
    root = tmp_path / "cvc"
    for folder in ("Original", "Ground Truth"):
        (root / folder).mkdir(parents=True)
        for path in sorted((CVC / folder).glob("*.tif"))[:2]:
            shutil.copy(path, root / folder / path.name)  # copies: the shared data stay untouched
    out = tmp_path / "out"
    result = _invoke(str(root), "--model", str(checkpoint), "--out", str(out), "--deletion-steps", "0", "--no-gallery")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 and all(r["has_ground_truth"] == "True" and r["dice"] != "" for r in rows)
    stem = rows[0]["stem"]
    assert np.load(out / f"{stem}_heatmap.npy").shape == (288, 384)  # CVC-ClinicDB frames are 384x288


def test_explain_odd_names_in_csv_html_and_figures(checkpoint: Path, tmp_path: Path) -> None:
    """A non-UTF-8 file name once crashed explain (matplotlib TypeError; metrics.csv,
    summary.json and the gallery lost) and CJK names leaked missing-glyph warnings."""
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    names = [os.fsdecode(b"bad\xff\xfe.jpg"), "息肉.png", "[bold]x.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            folder / name, format="PNG" if name.endswith("png") else "JPEG"
        )
    out = tmp_path / "out"
    result = _invoke(
        str(folder), "--model", str(checkpoint), "--out", str(out), "--device", "cpu", "--deletion-steps", "0"
    )
    assert result.exit_code == 0, result.output
    assert "Glyph" not in result.output and "Traceback" not in result.output
    rows = list(csv.DictReader((out / "metrics.csv").open(encoding="utf-8")))
    assert sorted(Path(r["image"]).name for r in rows) == sorted(["bad\\xff\\xfe.jpg", "息肉.png", "[bold]x.png"])
    assert {r["stem"] for r in rows} == {"bad%FF%FE", "息肉", "[bold]x"}
    for stem in ("bad%FF%FE", "息肉", "[bold]x"):
        assert (out / f"{stem}_panel.png").is_file() and (out / f"{stem}_heatmap.npy").is_file()
    page = (out / "gallery.html").read_text(encoding="utf-8")
    assert "bad%FF%FE" in page and "息肉" in page and page.count("data:image/png;base64,") == 3
    assert json.loads((out / "summary.json").read_text())["explained"] == 3


def test_explain_on_a_forward_only_engine_gives_torch_heatmaps(
    checkpoint: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--engine onnxruntime: the closed-form head gradient reproduces torch fp32's heatmaps; export cached."""
    import functools

    from polypseg.inference import export

    monkeypatch.setenv("POLYPSEG_CACHE", str(tmp_path / "cache"))
    # The torch.export-based exporter of this graph is covered in test_engine_gradcam.py; the TorchScript one is quicker.
    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    common = [
        str(dataset),
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--deletion-steps",
        "0",
        "--precision",
        "fp32",
    ]
    torch_out, engine_out = tmp_path / "torch", tmp_path / "engine"
    assert _invoke(*common, "--out", str(torch_out)).exit_code == 0
    result = _invoke(*common, "--out", str(engine_out), "--engine", "onnxruntime")
    assert result.exit_code == 0, result.output
    for stem in SIZES:
        np.testing.assert_allclose(
            np.load(engine_out / f"{stem}_heatmap.npy"), np.load(torch_out / f"{stem}_heatmap.npy"), atol=1e-3
        )
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.gradcam32.onnx"))
    assert len(cached) == 1
    assert _invoke(*common, "--out", str(tmp_path / "again"), "--engine", "onnxruntime").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.gradcam32.onnx")) == cached  # exported once

    for extra, message in (
        (["--engine", "tensorrt"], "--engine tensorrt: choose one of torch, onnxruntime, openvino"),
        (["--engine", "openvino", "--method", "scorecam"], "--engine openvino computes the paper's Grad-CAM"),
    ):
        result = _invoke(*common, "--out", str(tmp_path / "bad"), *extra)
        assert isinstance(result.exception, PolypsegError) and message in str(result.exception)


def test_explain_summary_records_the_engine_and_the_precision_computed_in(
    checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    from polypseg.core.precision import resolve_precision

    out = tmp_path / "out"
    image = str(dataset / "images" / "a.png")
    result = _invoke(image, "--model", str(checkpoint), "--out", str(out), "--device", "cpu", "--deletion-steps", "0")
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "summary.json").read_text())["settings"]
    computed = resolve_precision("auto", "cpu")  # 'auto' as given, resolved on this machine
    assert settings["engine"] == "torch" and settings["precision"] == settings["metrics_precision"] == computed


def test_explain_refuses_onnxruntime_bf16_before_loading_or_creating_out(
    checkpoint: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polypseg.models import checkpoint as checkpoints

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(checkpoints, "load_checkpoint", never)
    out = tmp_path / "out"
    args = ("--model", str(checkpoint), "--out", str(out), "--engine", "onnxruntime", "--precision", "bf16")
    result = _invoke(str(dataset / "images" / "a.png"), *args)
    assert isinstance(result.exception, PolypsegError), result.output
    assert "--engine onnxruntime --precision bf16" in str(result.exception) and not out.exists()


def test_a_rerun_into_the_same_out_leaves_no_earlier_skipped_csv(
    checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ("--model", str(checkpoint), "--out", str(out), "--device", "cpu", "--deletion-steps", "0", "--no-gallery")
    first = _invoke(str(dataset / "images" / "a.png"), str(dataset / "images" / "broken.jpg"), *args)
    assert first.exit_code == 0 and (out / "skipped.csv").is_file(), first.output
    again = _invoke(str(dataset / "images" / "a.png"), *args)
    assert again.exit_code == 0 and not (out / "skipped.csv").exists(), again.output


def test_a_rerun_without_a_gallery_leaves_no_earlier_gallery(checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("--model", str(checkpoint), "--out", str(out), "--device", "cpu", "--deletion-steps", "0")
    first = _invoke(str(dataset / "images" / "a.png"), *args)
    assert first.exit_code == 0 and (out / "gallery.html").is_file(), first.output
    again = _invoke(str(dataset / "images" / "a.png"), *args, "--no-gallery")
    assert again.exit_code == 0 and not (out / "gallery.html").exists(), again.output


def test_explain_names_a_model_evaluated_with_flip_tta(dataset: Path, tmp_path: Path) -> None:
    from polypseg.models.checkpoint import load_checkpoint, save_checkpoint

    tiny = load_checkpoint(save_tiny_checkpoint(tmp_path / "plain"))
    tiny.config.train.tta_flip = True  # as the strong recipe sets it
    model = save_checkpoint(tmp_path / "strong", tiny.model, tiny.config)
    args = ("--out", str(tmp_path / "out"), "--device", "cpu", "--deletion-steps", "0", "--no-gallery")
    result = _invoke(str(dataset / "images" / "a.png"), "--model", str(model), *args)
    assert result.exit_code == 0, result.output
    assert "evaluated with flip TTA" in result.output and "explain has no TTA" in result.output
    plain = _invoke(str(dataset / "images" / "a.png"), "--model", str(tmp_path / "plain" / "best"), *args)
    assert plain.exit_code == 0 and "flip TTA" not in plain.output, plain.output
