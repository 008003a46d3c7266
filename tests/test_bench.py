"""Benchmark: result keys and consistency (no timing thresholds), device naming, CLI rows."""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from polypseg.cli.main import app
from polypseg.core.precision import resolve_precision
from polypseg.experiments.bench import (
    BACKEND_SPECS,
    BenchError,
    available_backends,
    benchmark,
    device_name,
    load_for_bench,
    random_checkpoint,
)
from polypseg.inference.predictor import Predictor
from polypseg.models.checkpoint import load_checkpoint, save_checkpoint
from polypseg.models.factory import create_model

from helpers import tiny_config

KEYS = {
    "median_ms",
    "p10_ms",
    "p90_ms",
    "images_per_s",
    "device_name",
    "backend",
    "batch_size",
    "image_size",
    "pipeline",
    "precision",
    "mode",
}


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("pipeline", ["model", "end-to-end"])
def test_benchmark_module_returns_consistent_figures(pipeline: str) -> None:
    result = benchmark(_Tiny(), batch_size=3, image_size=32, warmup=1, repeats=4, pipeline=pipeline, device="cpu")
    assert KEYS <= set(result)
    assert result["batch_size"] == 3 and result["image_size"] == 32 and result["pipeline"] == pipeline
    # the precision rule's choice on this machine (bf16 where the CPU computes it natively)
    assert (
        result["backend"] == "torch"
        and result["precision"] == resolve_precision("auto", "cpu")
        and result["mode"] == "eager"
    )
    assert 0 < result["min_ms"] <= result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["images_per_s"] == pytest.approx(3 / (result["median_ms"] / 1000))
    assert result["device_name"] == device_name("cpu")


def test_device_name_names_cpu_and_cores() -> None:
    name = device_name("cpu")
    assert name.endswith("cores)") and len(name) > len(" (2 cores)")


def test_benchmark_rejects_bad_options() -> None:
    predictor = Predictor.from_model(_Tiny(), image_size=32, device="cpu")
    with pytest.raises(BenchError, match="pipeline"):
        benchmark(predictor, pipeline="disk")
    with pytest.raises(BenchError, match="image_size"):
        benchmark(predictor, image_size=64)
    with pytest.raises(BenchError, match="mode"):
        benchmark(predictor, mode="max-autotune")


@pytest.mark.slow
def test_random_checkpoint_is_the_default_architecture(tmp_path: Path) -> None:
    path = random_checkpoint(tmp_path, image_size=64)
    checkpoint = load_checkpoint(path)
    assert checkpoint.config.model.encoder == "resnet34" and checkpoint.config.train.image_size == 64
    predictor = load_for_bench("random", "torch", device="cpu", image_size=64, workdir=tmp_path)
    assert predictor.image_size == 64 and predictor.backend == "torch"


@pytest.mark.slow
def test_bench_cli_all_backends_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polypseg.inference import export

    # The torch.export-based exporter is covered in test_export.py; the TorchScript one is quicker.
    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    config = tiny_config(image_size=32)
    checkpoint = save_checkpoint(tmp_path / "tiny", create_model(config.model).eval(), config)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            calibration / f"{i}.png"
        )
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--model",
        str(checkpoint),
        "--backend",
        "all",
        "--device",
        "cpu",
        "--repeats",
        "2",
        "--warmup",
        "1",
    ]
    args += ["--batch-size", "2", "--calibration", str(calibration), "--json", str(out), "--markdown"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    expected = available_backends("cpu")  # every engine installed here; bf16 rows where the CPU has it
    assert {"torch", "onnxruntime", "onnxruntime-int8"} <= set(expected)
    assert [(r["backend"], r["pipeline"]) for r in rows] == [
        (backend, pipeline) for backend in expected for pipeline in ("model", "end-to-end")
    ]
    assert [r["precision"] for r in rows[::2]] == [BACKEND_SPECS[b][1] for b in expected]
    assert all(KEYS <= set(r) and r["batch_size"] == 2 for r in rows)
    assert "| device | backend |" in result.stdout and "images/s" in result.output


def test_bench_rounds_interleave_backends_and_pair_their_speedups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polypseg.experiments import bench
    from polypseg.inference import export

    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    monkeypatch.setattr(bench, "available_backends", lambda device: ["torch", "onnxruntime"])
    config = tiny_config(image_size=32)
    checkpoint = save_checkpoint(tmp_path / "tiny", create_model(config.model).eval(), config)
    order: list[str] = []
    rows = bench.benchmark_backends(
        checkpoint, backend="all", device="cpu", repeats=5, warmup=1, rounds=2, step=order.append
    )
    assert [(r["backend"], r["pipeline"]) for r in rows] == [
        ("torch", "model"), ("torch", "end-to-end"), ("onnxruntime", "model"), ("onnxruntime", "end-to-end")
    ]  # fmt: skip
    # both loaded before any timing, then every setting visited once per round
    timing = [m for m in order if m.startswith(("loading", "round"))]
    assert [m.split(":")[0] for m in timing] == ["loading torch", "loading onnxruntime"] + ["round 1/2"] * 4 + [
        "round 2/2"
    ] * 4
    for r in rows:
        assert r["rounds"] == 2 and r["repeats"] == 5 and len(r["times_ms"]) == 5  # 3 + 2
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]))
        assert r["first_backend"] == "torch" and r["speedup_vs_first"] > 0
        assert len(r["round_median_ms"]) == 2
    assert rows[0]["speedup_vs_first"] == rows[1]["speedup_vs_first"] == 1.0  # each pipeline against its own torch row
    assert "vs torch (paired rounds)" in bench.bench_markdown(rows)
    with pytest.raises(bench.BenchError, match="--rounds 6"):
        bench.benchmark_backends(checkpoint, backend="torch", device="cpu", repeats=5, rounds=6)


def test_bench_cli_rejects_unknown_backend(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--model", "random", "--backend", "tensorrt", "--device", "cpu"])
    assert result.exit_code == 2 and "--backend tensorrt" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_training_speed_of_a_recipe_times_the_real_step(tmp_path):
    from polypseg.experiments.bench_train import benchmark_training, training_markdown

    config = tiny_config(recipe="strong", image_size=32)  # EMA, crops, dice_bce: the full step
    config.train.batch_size = 4
    [result] = benchmark_training(config, device="cpu", steps=3, warmup=2, train_images=40)
    assert result["images_per_s"] > 0 and result["first_step_s"] > 0
    assert result["ema"] is True and result["compile"] is False  # compile applies on CUDA only
    assert result["images_per_s"] == pytest.approx(4 / (result["step_ms"] / 1000))
    assert result["epoch_s"] == pytest.approx(10 * result["step_ms"] / 1000)  # 40 images / batch 4
    assert result["run_minutes"] == pytest.approx(result["epoch_s"] * config.train.epochs / 60)
    assert result["achieved_tflops"] == pytest.approx(result["train_gflop_per_image"] * result["images_per_s"] / 1000)
    assert "| strong |" in training_markdown([result])
    with pytest.raises(BenchError, match="steps, warmup"):
        benchmark_training(config, device="cpu", steps=0)


@pytest.mark.slow
def test_training_variants_side_by_side_with_flops_and_peak(monkeypatch):
    from polypseg.experiments import bench_train
    from polypseg.experiments.bench_train import CPU_VARIANTS, benchmark_training, forward_flops, training_markdown

    # The peak's 2048-wide matmuls took most of this test's time; the rows only need a measured peak.
    monkeypatch.setattr(bench_train, "matmul_peak", functools.partial(bench_train.matmul_peak, n=256, repeats=2))

    config = tiny_config(image_size=32)
    config.train.batch_size = 2
    config.train.progressive_size, config.train.progressive_epochs = 16, 1
    between: list[int] = []
    rows = benchmark_training(
        config, device="cpu", steps=1, warmup=1, train_images=8, variants=CPU_VARIANTS, rounds=2, peak=True,
        between_rounds=lambda: between.append(len(between)),
    )  # fmt: skip
    assert between == [0, 1, 2]  # before the first round and after each
    assert [r["variant"] for r in rows] == list(CPU_VARIANTS)
    assert [(r["precision"], r["channels_last"]) for r in rows] == [("fp32", False), ("fp32", True), ("bf16", True)]
    # speed-ups are paired per round against the first variant (itself exactly 1x)
    assert all(len(r["round_step_ms"]) == 2 and r["first_variant"] == "fp32-nchw" for r in rows)
    assert rows[0]["speedup_vs_first"] == 1.0
    a, b = rows[0]["round_step_ms"], rows[2]["round_step_ms"]
    assert rows[2]["speedup_vs_first"] == pytest.approx(statistics.median([a[0] / b[0], a[1] / b[1]]))
    # a conv net's forward: more FLOPs at a larger size, about quadratically
    assert forward_flops(config, 64) == pytest.approx(4 * forward_flops(config, 32), rel=0.05)
    for r in rows:
        assert r["train_gflop_per_image"] == pytest.approx(3 * forward_flops(config) / 1e9)
        assert r["matmul_peak_bf16_tflops"] > 0 and r["fraction_of_bf16_peak"] > 0
        assert r["matmul_peak_fp32_tflops"] > 0 and "round_probe_tflops" not in r  # no probes without a hook
        assert r["progressive_size"] == 16 and r["progressive_step_ms"] > 0
        # 1 epoch at 16 px and 0 at 32 (epochs=1): the run estimate is the small step's
        assert r["run_minutes"] == pytest.approx(4 * r["progressive_step_ms"] / 1000 / 60)
    table = training_markdown(rows)
    assert "bf16-cl" in table and "of bf16 peak" in table and "NCHW" in table and "channels-last" in table
    assert "vs fp32-nchw (paired rounds)" in table


@pytest.mark.slow
def test_bench_train_cli(tmp_path):
    out = tmp_path / "train_speed.json"
    result = CliRunner().invoke(
        app,
        [
            "bench-train",
            "--recipe",
            "demo",
            "--set",
            "model.encoder=resnet18",
            "--set",
            "model.decoder_channels=[16,16,16,16,16]",
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
            "--markdown",
            "--label",
            "demo-b2",
            "--variants",
            "recipe",
            "--no-peak",
        ],
    )
    assert result.exit_code == 0, result.output
    [saved] = json.loads(out.read_text())
    assert saved["batch_size"] == 2 and saved["image_size"] == 32 and saved["recipe"] == "demo"
    assert "| demo-b2 |" in result.output and saved["label"] == "demo-b2"


@pytest.mark.slow
def test_bench_train_cli_defaults_to_the_cpu_variants_and_rejects_unknown_ones(tmp_path):
    tiny = [
        "--recipe",
        "demo",
        "--set",
        "model.encoder=resnet18",
        "--set",
        "model.decoder_channels=[16,16,16,16,16]",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["bench-train", *tiny, "--rounds", "1", "--no-peak", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [row["variant"] for row in json.loads(out.read_text())] == ["fp32-nchw", "fp32-cl", "bf16-cl"]
    result = CliRunner().invoke(app, ["bench-train", *tiny, "--variants", "fp16"])
    assert result.exit_code == 2 and "--variants fp16" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_training_breakdown_accounts_for_every_part_of_an_epoch():
    from polypseg.experiments.bench_train import breakdown_markdown, training_breakdown

    config = tiny_config(recipe="strong", image_size=32)  # EMA on: every phase exists
    config.train.batch_size = 2
    config.train.val_fraction = 0.1
    result = training_breakdown(config, device="cpu", steps=2, warmup=1, train_images=8, val_images=4)
    assert set(result["seconds"]) == {
        "augment",
        "forward",
        "backward",
        "optimizer",
        "ema",
        "validation",
        "checkpoint writes",
    }
    assert all(v > 0 for v in result["seconds"].values())
    assert result["epoch_s"] == pytest.approx(sum(result["seconds"].values()))
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert "| checkpoint writes |" in breakdown_markdown(result)


def test_gradcam_benchmark_times_each_precision_and_compares_heatmaps(tiny_cv_run):
    from polypseg.data.cache import build_cache
    from polypseg.data.sample_data import sample_dataset_path
    from polypseg.experiments.bench_explain import benchmark_gradcam
    from polypseg.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tiny_cv_run / "fold_0" / "best")
    images = build_cache(sample_dataset_path(), 64, cache_dir=tiny_cv_run.parent / "cache", progress=False).images[:6]
    rows = benchmark_gradcam(
        checkpoint.model, n=6, batch_size=4, device="cpu", precisions=("fp32", "bf16"), images=images, compare=6
    )
    fp32, bf16 = rows
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["heatmap_correlation"] == pytest.approx(1.0) and fp32["speedup_vs_fp32"] == pytest.approx(1.0)
    assert bf16["images_compared"] >= 1 and 0.9 < bf16["heatmap_correlation"] <= 1.0 + 1e-9
    assert all(r["n"] == 6 and r["heatmaps_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_explain_cli(tmp_path):
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(
        app,
        [
            "bench-explain",
            "--model",
            "random",
            "--images",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--json",
            str(out),
            "--markdown",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [r["precision"] for r in json.loads(out.read_text())] == ["fp32", "bf16"]
    assert "| bf16 |" in result.output


def test_gradcam_benchmark_engine_rows_match_torch_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward-only engine row (closed-form head gradient) gives torch fp32's heatmaps: correlation ~1."""
    import numpy as np

    from polypseg.experiments.bench_explain import benchmark_gradcam, gradcam_markdown
    from polypseg.inference import export
    from polypseg.models.factory import create_model

    # The torch.export-based export of the engine's graph is covered in test_engine_gradcam.py.
    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    torch.manual_seed(0)
    model = create_model(encoder="resnet18", decoder_channels=(16, 16, 16, 16, 16)).eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    rows = benchmark_gradcam(
        model, n=4, batch_size=2, device="cpu", precisions=("fp32",), images=images, compare=4, engines=("onnxruntime",)
    )
    torch_row, engine_row = rows
    assert (torch_row["engine"], engine_row["engine"], engine_row["precision"]) == ("torch", "onnxruntime", "fp32")
    assert engine_row["images_compared"] >= 1 and engine_row["heatmap_correlation"] == pytest.approx(1.0, abs=1e-4)
    assert engine_row["speedup_vs_fp32"] > 0
    assert "| onnxruntime | fp32 |" in gradcam_markdown(rows)


@pytest.mark.slow
def test_random_model_is_made_and_exported_once_per_workdir_outside_the_users_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polypseg.inference import export

    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("POLYPSEG_CACHE", str(cache))
    workdir = tmp_path / "work"
    workdir.mkdir()
    for backend in ("onnxruntime", "onnxruntime"):
        assert load_for_bench("random", backend, device="cpu", image_size=64, workdir=workdir).backend == "onnxruntime"
    assert len(list(workdir.glob("random*.safetensors"))) == 1
    assert len(list((workdir / "onnx").glob("*.onnx"))) == 1  # one export, reused
    assert not (cache / "onnx").exists()
    plain = next((workdir / "onnx").glob("*.onnx"))
    with pytest.raises(BenchError, match="not a quantized model"):
        load_for_bench(plain, "onnxruntime-int8", device="cpu", workdir=workdir)


def test_a_heatmap_that_lost_fp32s_prediction_counts_as_no_agreement() -> None:
    """Correlation with fp32: an empty (flat) map where fp32 found something scores 0, not skipped."""
    from polypseg.experiments.bench_explain import _correlation

    reference = np.array([0.0, 0.2, 0.9, 0.4])
    assert _correlation(reference, reference * 3) == pytest.approx(1.0)
    assert _correlation(reference, np.zeros(4)) == 0.0
    assert _correlation(reference, -reference) == pytest.approx(-1.0)


def test_bench_auto_times_the_engine_predict_auto_uses(monkeypatch) -> None:
    from polypseg.core import precision
    from polypseg.experiments.bench import auto_backend
    from polypseg.inference import predictor

    assert auto_backend("cuda") == "torch"
    monkeypatch.setattr(predictor, "openvino_installed", lambda: False)
    assert auto_backend("cpu") == "onnxruntime"
    monkeypatch.setattr(predictor, "openvino_installed", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert auto_backend("cpu") == "openvino-bf16"
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    assert auto_backend("cpu") == "openvino"


def test_bench_auto_takes_int8_where_every_checkpoint_has_a_validated_export(tmp_path, monkeypatch) -> None:
    from polypseg.experiments.bench import auto_backend
    from polypseg.inference import export, predictor

    config = tiny_config(image_size=32)
    checkpoint = save_checkpoint(tmp_path / "tiny", create_model(config.model).eval(), config)
    validated: set[Path] = set()
    monkeypatch.setattr(export, "find_validated_int8", lambda c, cache_dir=None: c if c in validated else None)
    for installed, engine in ((True, "openvino"), (False, "onnxruntime")):
        monkeypatch.setattr(predictor, "openvino_installed", lambda i=installed: i)
        validated.clear()
        assert auto_backend("cpu", checkpoint) != f"{engine}-int8"
        validated.add(checkpoint)
        assert auto_backend("cpu", checkpoint) == f"{engine}-int8"
        assert auto_backend("cpu", "random") != f"{engine}-int8" and auto_backend("cuda", checkpoint) == "torch"
    assert auto_backend("cpu", tmp_path / "missing") == "onnxruntime"  # the load names the problem, not the choice


def test_bench_names_the_int8_model_it_times_and_an_unused_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polypseg.experiments import bench
    from polypseg.inference import export

    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    config = tiny_config(image_size=32)
    checkpoint = save_checkpoint(tmp_path / "tiny", create_model(config.model).eval(), config)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(calibration / "0.png")
    int8 = export.quantize_onnx_int8(
        export.export_onnx(checkpoint), export.int8_path_for(checkpoint), calibration, max_images=1
    )
    heard: list[str] = []
    predictor = load_for_bench(checkpoint, "onnxruntime-int8", device="cpu", calibration=calibration, say=heard.append)
    assert predictor.backend == "onnxruntime"
    (note,) = heard
    assert str(int8) in note and "--calibration was not used" in note

    loaded: list[str] = []
    missing = tmp_path / "no-such-folder"
    with pytest.raises(BenchError, match="--calibration .*no-such-folder: no such file or folder"):
        bench.benchmark_backends(
            checkpoint, backend="onnxruntime-int8", device="cpu", calibration=missing, step=loaded.append
        )
    assert loaded == []  # refused before anything was loaded
