"""benchmarks/speed_phases.py: steady rounds of a machine whose speed changes (scripted probes, no timing checked)."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

from polypseg.models.checkpoint import save_checkpoint
from polypseg.models.factory import create_model

from helpers import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_phases.py"


@pytest.fixture(scope="module")
def phases():
    spec = importlib.util.spec_from_file_location("speed_phases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scripted_matmul(monkeypatch: pytest.MonkeyPatch, readings: list[float]) -> None:
    """Every matmul reading (the probes, then the full peaks) from ``readings``, in FLOP/s."""
    from polypseg.experiments import bench_train

    values = iter(readings)
    monkeypatch.setattr(bench_train, "matmul_peak", lambda *args, **kwargs: next(values))


def test_steady_rounds_are_those_between_two_fast_probes(phases):
    # round r lies between probes r and r + 1; fast = at least 0.8 x 2.0 = 1.6
    assert phases.steady_rounds([2.0, 1.9, 0.8, 1.7, 1.6], peak=2.0) == [0, 3]
    assert phases.steady_rounds([2.0, 1.59], peak=2.0) == []
    assert phases.steady_rounds([1.0, 1.0, 1.0], peak=2.0, fraction=0.5) == [0, 1]
    assert phases.steady_rounds([2.0], peak=2.0) == []  # no round timed


def test_a_timing_is_steady_only_when_every_probe_around_it_is(phases):
    assert phases.is_steady([1.6, 2.0, 1.7], peak=2.0)
    assert not phases.is_steady([2.0, 1.59, 2.0], peak=2.0)  # one slow probe inside is enough
    assert phases.is_steady([1.0], peak=2.0, fraction=0.5)


def test_a_row_drifted_only_when_a_probe_fell_below_the_steady_share(phases):
    assert phases.drifted({"round_probe_tflops": [2.0, 0.5], "probe_peak_tflops": 2.0})
    assert not phases.drifted({"round_probe_tflops": [2.0, 1.9], "probe_peak_tflops": 2.0})
    assert not phases.drifted({"probe_peak_tflops": 2.0})  # never probed


@pytest.mark.slow
def test_training_rounds_report_the_machines_fast_phase(phases, monkeypatch):
    """A drifting machine: steady figures are the medians of the steady rounds only."""
    # probes before round 0 and after rounds 0, 1, 2; then the full bf16 and fp32 peaks
    _scripted_matmul(monkeypatch, [2.0e12, 1.9e12, 0.5e12, 2.0e12, 1.8e12, 0.3e12])
    config = tiny_config(image_size=32)
    config.train.batch_size = 2
    options = {"device": "cpu", "steps": 1, "warmup": 1, "train_images": 8, "variants": ("fp32-nchw", "fp32-cl")}
    first, second = rows = phases.probed_training(config, rounds=3, **options)
    for row in rows:
        assert row["round_probe_tflops"] == [2.0, 1.9, 0.5, 2.0]
        assert row["probe_peak_tflops"] == 2.0  # the best probe beats the full measurement (1.8)
        assert row["steady_rounds"] == [0]  # round 1 ends and round 2 starts at 0.5
        assert row["steady_step_ms"] == row["round_step_ms"][0]
    assert second["steady_speedup_vs_first"] == pytest.approx(first["round_step_ms"][0] / second["round_step_ms"][0])
    assert phases.drifted(first)
    summary = " ".join(phases.steady_summary(rows, lambda r: r["variant"], "steady_step_ms").split())
    assert "this machine's bf16 matmul speed changed between rounds (0.50-2.00 TFLOP/s" in summary
    assert "1 of 3 rounds ran with it at >= 80% of its best: fp32-nchw" in summary and "(1.00x), fp32-cl" in summary
    # a steady machine: nothing to warn about
    _scripted_matmul(monkeypatch, [2.0e12, 1.9e12, 2.0e12, 1.9e12, 0.3e12])
    rows = phases.probed_training(config, rounds=2, **options)
    assert rows[0]["steady_rounds"] == [0, 1] and not phases.drifted(rows[0])
    assert phases.steady_summary(rows, lambda r: r["variant"], "steady_step_ms").startswith("the machine's speed held")


def test_inference_rounds_report_the_machines_fast_phase(phases, tmp_path, monkeypatch):
    # probes before round 0 and after rounds 0, 1, 2, then the full peak: only round 0 is steady
    _scripted_matmul(monkeypatch, [2.0e12, 2.0e12, 0.5e12, 2.0e12, 1.5e12])
    config = tiny_config(image_size=32)
    checkpoint = save_checkpoint(tmp_path / "tiny", create_model(config.model).eval(), config)
    [row] = phases.probed_backends(
        checkpoint, backend="torch", device="cpu", repeats=6, warmup=1, rounds=3, pipeline="model"
    )
    assert row["round_probe_tflops"] == [2.0, 2.0, 0.5, 2.0] and row["steady_rounds"] == [0]
    assert row["steady_median_ms"] == pytest.approx(statistics.median(row["times_ms"][:2]))  # round 0: 2 of 6
    assert row["steady_images_per_s"] == pytest.approx(1000 / row["steady_median_ms"])
    assert row["steady_speedup_vs_first"] == 1.0
    summary = " ".join(phases.steady_summary([row], lambda r: r["backend"], "steady_median_ms").split())
    assert "changed between rounds (0.50-2.00 TFLOP/s" in summary and "1 of 3 rounds" in summary
    assert "torch " in summary.split(": ", 1)[1]
