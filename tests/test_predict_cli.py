"""``polypseg predict`` and ``polypseg export`` end to end on tiny models and files."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from polypseg.cli.main import app
from polypseg.inference import export
from polypseg.models.checkpoint import save_checkpoint
from polypseg.models.factory import create_model

from helpers import tiny_config


def _save_tiny(path: Path, seed: int = 0) -> Path:
    config = tiny_config(image_size=64)
    torch.manual_seed(seed)
    return save_checkpoint(path, create_model(config.model).eval(), config, threshold=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYPSEG_CACHE", str(tmp_path / "polypseg-cache"))  # not the user's ~/.cache


@pytest.fixture()
def fast_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch.export-based exporter is covered in test_export.py; here the quicker one will do.
    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)).save(root / "rgba.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image")
    return root


def test_predict_folder_with_a_corrupt_file(checkpoint: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "in")
    out = tmp_path / "out"
    result = _invoke(
        "predict", str(folder), "--model", str(checkpoint), "--out", str(out), "--backend", "torch", "--batch-size", "2"
    )
    assert result.exit_code == 0, result.output
    assert "corrupt.jpg" in result.output and "Traceback" not in result.output
    with open(out / "predictions.csv") as handle:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(handle)}
    assert set(rows) == {"rgb.jpg", "gray.png", "rgba.png"}
    assert list(next(iter(rows.values()))) == [
        "file",
        "width",
        "height",
        "area_pixels",
        "area_fraction",
        "mean_confidence",
        "threshold",
        "mask",
    ]
    for name, (width, height) in {"rgb.jpg": (70, 50), "gray.png": (30, 40), "rgba.png": (47, 33)}.items():
        stem = Path(name).stem
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
        assert int(rows[name]["area_pixels"]) == int((mask == 255).sum())
        assert (int(rows[name]["width"]), int(rows[name]["height"])) == (width, height)
        assert float(rows[name]["area_fraction"]) == pytest.approx(
            int(rows[name]["area_pixels"]) / (width * height), abs=1e-6
        )
        assert np.asarray(Image.open(out / "overlays" / f"{stem}.png")).shape == (height, width, 3)
    with open(out / "skipped.csv") as handle:
        assert [Path(r["file"]).name for r in csv.DictReader(handle)] == ["corrupt.jpg"]


def test_predict_exit_codes(checkpoint: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"nope")
    nothing = _invoke(
        "predict", str(corrupt), "--model", str(checkpoint), "--out", str(tmp_path / "o1"), "--backend", "torch"
    )
    assert nothing.exit_code == 1 and "corrupt.png" in nothing.output
    missing_model = _invoke(
        "predict", str(corrupt), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")
    )
    assert (
        missing_model.exit_code == 2 and "nowhere" in missing_model.output and "Traceback" not in missing_model.output
    )
    no_inputs = _invoke(
        "predict", str(tmp_path / "absent.jpg"), "--model", str(checkpoint), "--out", str(tmp_path / "o3")
    )
    assert no_inputs.exit_code == 2 and "absent.jpg" in no_inputs.output
    bad_smooth = _invoke(
        "predict", str(corrupt), "--model", str(checkpoint), "--out", str(tmp_path / "o4"), "--smooth", "2"
    )
    assert bad_smooth.exit_code == 2 and "--smooth" in bad_smooth.output


def test_predict_run_folder_saves_probabilities_and_uncertainty(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for fold in (0, 1):
        (run / f"fold_{fold}").mkdir(parents=True)
        _save_tiny(run / f"fold_{fold}" / "best", seed=fold)
    (run / "summary.json").write_text(json.dumps({"threshold": 0.3}))
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (36, 52, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    result = _invoke(
        "predict",
        str(image),
        "--model",
        str(run),
        "--out",
        str(out),
        "--backend",
        "torch",
        "--save-probabilities",
        "--no-overlays",
    )
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["threshold"]) == 0.3 and float(row["uncertainty_mean"]) > 0
    probability = np.asarray(Image.open(out / "probabilities" / "x.png"))
    uncertainty = np.asarray(Image.open(out / "uncertainty" / "x.png"))
    assert probability.shape == uncertainty.shape == (36, 52)
    mask = np.asarray(Image.open(out / "masks" / "x.png")) == 255
    # masks come from the float probabilities; the 8-bit copy agrees up to rounding at the threshold
    assert np.mean(mask == (probability >= round(0.3 * 255))) > 0.99
    assert not (out / "overlays").exists()


def _clip(video: Path) -> Path:
    """A 6-frame 48x32 MPEG-4 clip of a bright square moving right."""
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(6):
            frame = np.full((32, 48, 3), 40, np.uint8)
            frame[8:24, 4 + 4 * i : 20 + 4 * i] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return video


def test_predict_video_with_smoothing(checkpoint: Path, tmp_path: Path) -> None:
    video = _clip(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    result = _invoke(
        "predict", str(video), "--model", str(checkpoint), "--out", str(out), "--backend", "torch", "--smooth", "0.5"
    )
    assert result.exit_code == 0, result.output
    assert "consistency" in result.output and "alpha 0.5" in result.output
    assert (out / "clip_overlay.mp4").is_file()
    with open(out / "clip_frames.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and "iou_with_previous_raw" in rows[0]
    with open(out / "videos.csv") as handle:
        (summary,) = list(csv.DictReader(handle))
    assert int(summary["frames"]) == 6 and summary["consistency_smoothed"] != ""
    assert not (out / "predictions.csv").exists()


def test_export_cli_reports_difference(checkpoint: Path, tmp_path: Path, fast_exporter: None) -> None:
    out = tmp_path / "model.onnx"
    result = _invoke(
        "export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out), "--json", str(tmp_path / "r.json")
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and export.onnx_sidecar(out).is_file()
    assert "max |p_onnx - p_torch|" in result.output
    (report,) = json.loads((tmp_path / "r.json").read_text())
    assert report["max_abs_diff_random"] < 1e-4 and report["max_abs_diff_real"] < 1e-4
    wrong = _invoke("export", "--model", str(checkpoint), "--format", "tflite")
    assert wrong.exit_code == 2 and "--format tflite" in wrong.output


def test_predict_with_onnxruntime_backend(checkpoint: Path, tmp_path: Path, fast_exporter: None) -> None:
    folder = _folder(tmp_path / "in")
    torch_out, ort_out = tmp_path / "torch", tmp_path / "ort"
    assert (
        _invoke(
            "predict", str(folder), "--model", str(checkpoint), "--out", str(torch_out), "--backend", "torch"
        ).exit_code
        == 0
    )
    result = _invoke(
        "predict", str(folder), "--model", str(checkpoint), "--out", str(ort_out), "--backend", "onnxruntime"
    )
    assert result.exit_code == 0, result.output and "onnxruntime" in result.output
    # torch runs bf16 autocast on a CPU with native bf16 (polypseg.core.precision); onnxruntime is fp32
    agreement = 0.99 if _cpu_bf16() else 0.999
    for name in ("rgb", "gray", "rgba"):
        a = np.asarray(Image.open(torch_out / "masks" / f"{name}.png"))
        b = np.asarray(Image.open(ort_out / "masks" / f"{name}.png"))
        assert np.mean(a == b) > agreement


def _cpu_bf16() -> bool:
    try:
        from polypseg.core.precision import resolve_precision
    except ImportError:
        return False
    return resolve_precision("auto", "cpu") == "bf16"


def test_predict_exports_once_into_the_cache_never_into_the_run_folder(tmp_path: Path, fast_exporter: None) -> None:
    run = tmp_path / "run"
    for fold in (0, 1):
        (run / f"fold_{fold}").mkdir(parents=True)
        _save_tiny(run / f"fold_{fold}" / "best", seed=fold)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    folder = _folder(tmp_path / "in")
    cache = tmp_path / "my-cache"
    first = _invoke(
        "predict", str(folder), "--model", str(run), "--out", str(tmp_path / "o1"), "--cache-dir", str(cache)
    )
    assert first.exit_code == 0, first.output
    assert first.output.count("exporting 2 models to ONNX") == 1 and str(cache) in first.output.replace("\n", "")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # the run folder is untouched
    assert len(list((cache / "onnx").glob("*.onnx"))) == 2
    second = _invoke(
        "predict", str(folder), "--model", str(run), "--out", str(tmp_path / "o2"), "--cache-dir", str(cache)
    )
    assert second.exit_code == 0 and "exporting" not in second.output
    for name in ("rgb", "gray", "rgba"):
        a = np.asarray(Image.open(tmp_path / "o1" / "masks" / f"{name}.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "o2" / "masks" / f"{name}.png")))


def test_predict_sends_batch_size_images_per_pass_with_the_same_masks(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polypseg.inference.predictor import Predictor

    folder = _folder(tmp_path / "in")  # 3 readable images and a corrupt one
    sizes: list[int] = []
    real = Predictor.predict_model_size

    def recording(self, images):
        sizes.append(len(images))
        return real(self, images)

    monkeypatch.setattr(Predictor, "predict_model_size", recording)
    for batch in ("2", "1"):
        out = tmp_path / f"out{batch}"
        args = ("predict", str(folder), "--model", str(checkpoint), "--out", str(out), "--backend", "torch")
        assert _invoke(*args, "--batch-size", batch, "--precision", "fp32").exit_code == 0
    assert sizes == [2, 1, 1, 1, 1]
    for mask in (tmp_path / "out1" / "masks").iterdir():
        # the same model on other batch shapes: kernels may round differently, so a pixel right at
        # the threshold may flip; anything more is a wrong batch
        one, two = (np.asarray(Image.open(tmp_path / out / "masks" / mask.name)) for out in ("out1", "out2"))
        assert one.shape == two.shape and np.mean(one == two) > 0.999


def test_predict_threshold_must_lie_strictly_between_0_and_1(checkpoint: Path, tmp_path: Path) -> None:
    """As explain and serve: 0 or 1 would give a constant mask."""
    folder = _folder(tmp_path / "in")
    for value in ("0", "1", "1.5"):
        result = _invoke(
            "predict", str(folder), "--model", str(checkpoint), "--out", str(tmp_path / "o"), "--threshold", value
        )
        assert result.exit_code == 2 and "strictly between 0 and 1" in result.output, result.output


def test_predict_files_takes_its_options_by_name_and_returns_a_typed_summary(checkpoint: Path, tmp_path: Path) -> None:
    from polypseg.inference.predict_files import PredictSummary, predict_files

    folder = _folder(tmp_path / "in")
    with pytest.raises(TypeError):
        predict_files([folder], tmp_path / "unused", checkpoint)  # type: ignore[misc]  # options are keyword-only
    said: list[str] = []
    summary = predict_files(
        [folder], tmp_path / "out", model=checkpoint, backend="torch", overlays=False, say=said.append, progress=False
    )
    assert isinstance(summary, PredictSummary)
    assert (summary.images, summary.videos, summary.skipped, summary.done) == (3, 0, 1, 3)
    assert summary.closing == said[-1] and not (tmp_path / "out" / "overlays").exists()
    assert summary.to_json() == {"images": 3, "videos": 0, "skipped": 1, "done": 3, "closing": summary.closing}


def test_a_rerun_into_the_same_out_leaves_no_table_of_the_earlier_run(checkpoint: Path, tmp_path: Path) -> None:
    """Tables this run has no rows for are removed, not left to look current."""
    folder = _folder(tmp_path / "in")
    out = tmp_path / "out"
    first = _invoke("predict", str(folder), "--model", str(checkpoint), "--out", str(out), "--backend", "torch")
    assert first.exit_code == 0 and (out / "skipped.csv").is_file(), first.output
    (out / "videos.csv").write_text("file,frames\nearlier.mp4,6\n")  # as an earlier run on a video leaves it
    again = _invoke(
        "predict", str(folder / "rgb.jpg"), "--model", str(checkpoint), "--out", str(out), "--backend", "torch"
    )
    assert again.exit_code == 0, again.output
    assert not (out / "skipped.csv").exists() and not (out / "videos.csv").exists()
    with open(out / "predictions.csv") as handle:
        assert [Path(r["file"]).name for r in csv.DictReader(handle)] == ["rgb.jpg"]


def test_predict_names_each_option_it_does_not_apply(checkpoint: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "in")
    model = ("--model", str(checkpoint), "--backend", "torch", "--no-overlays")
    images = _invoke("predict", str(folder / "rgb.jpg"), *model, "--out", str(tmp_path / "o1"), "--smooth", "0.5")
    assert images.exit_code == 0 and "--smooth applies to videos only" in images.output, images.output
    video = _clip(tmp_path / "clip.mp4")
    both = _invoke(
        "predict", str(video), str(folder / "rgb.jpg"), *model, "--out", str(tmp_path / "o2"), "--save-probabilities"
    )
    assert both.exit_code == 0 and "the 1 video(s) get no probability maps" in both.output, both.output
    assert (tmp_path / "o2" / "probabilities" / "rgb.png").is_file()  # the image still gets its map
    plain = _invoke("predict", str(folder / "rgb.jpg"), *model, "--out", str(tmp_path / "o3"))
    assert plain.exit_code == 0 and "note:" not in plain.output, plain.output


def test_a_model_evaluated_with_flip_tta_is_named_when_run_without_it(tmp_path: Path) -> None:
    config = tiny_config(image_size=64)
    config.train.tta_flip = True
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "strong", create_model(config.model).eval(), config, threshold=0.5)
    image = _folder(tmp_path / "in") / "rgb.jpg"
    args = ("predict", str(image), "--model", str(model), "--backend", "torch", "--no-overlays")
    without = _invoke(*args, "--out", str(tmp_path / "o1"))
    assert without.exit_code == 0 and "evaluated with flip TTA" in without.output, without.output
    assert "pass --tta" in without.output
    with_tta = _invoke(*args, "--out", str(tmp_path / "o2"), "--tta")
    assert with_tta.exit_code == 0 and "flip TTA" not in with_tta.output, with_tta.output


def test_predict_help_says_which_backend_may_run_int8() -> None:
    import typer

    options = {param.opts[0]: param.help for param in typer.main.get_command(app).commands["predict"].params}
    assert "validated int8" in options["--backend"] and "never picks int8" in options["--backend"]
    assert "validated int8" in options["--precision"]
