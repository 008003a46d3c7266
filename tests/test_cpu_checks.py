"""benchmarks/cpu_checks.py's arithmetic and summaries on hand-made inputs (no timing is checked)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_checks.py"


@pytest.fixture(scope="module")
def cpu_checks():
    spec = importlib.util.spec_from_file_location("cpu_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_flops_count_two_per_multiply_add(cpu_checks):
    conv = torch.nn.Conv2d(4, 2, 3, stride=2, padding=1)
    output = conv(torch.zeros(1, 4, 8, 8))  # 2 x 4 x 4 outputs, each 4 x 3 x 3 products
    assert cpu_checks._conv_flops(conv, output) == 2 * 32 * 36
    grouped = torch.nn.Conv2d(4, 4, 3, padding=1, groups=2)
    output = grouped(torch.zeros(1, 4, 8, 8))  # each output sees 2 of the 4 channels
    assert cpu_checks._conv_flops(grouped, output) == 2 * 256 * 18


@pytest.mark.parametrize("input_grad", [True, False])
def test_a_convolution_is_timed_forward_and_backward(cpu_checks, input_grad):
    layer = torch.nn.Conv2d(4, 2, 3, padding=1, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8).bfloat16().requires_grad_(input_grad)
    timing = cpu_checks._time_conv(layer, x, repeats=1)
    assert set(timing) == {"forward_ms", "backward_ms", "forward_tflops", "backward_tflops"}
    assert all(value > 0 for value in timing.values())
    flops = 2 * 2 * 64 * 2 * 36
    # the backward counts one pass per gradient taken: the weight's, and the input's when it needs one
    assert timing["backward_tflops"] == pytest.approx(flops * (1 + input_grad) / timing["backward_ms"] / 1e9)


def test_summaries_pair_each_round_and_keep_the_uncontended_ones(cpu_checks, capsys):
    rounds = [
        {"round": 0, "probes": [2.0, 1.9], "slow_ms": 400.0, "fast_ms": 100.0},
        {"round": 1, "probes": [2.0, 0.5], "slow_ms": 900.0, "fast_ms": 300.0},  # a slow probe: contended
        {"round": 2, "probes": [1.8, 1.7], "slow_ms": 500.0, "fast_ms": 100.0},
    ]
    assert [r["round"] for r in cpu_checks._uncontended(rounds)] == [0, 2]
    cpu_checks._contended_summary("test", rounds, [("slow_ms", "fast_ms")], "ms")
    summary = json.loads(capsys.readouterr().out)
    assert summary["uncontended_rounds"] == 2 and summary["best_probe_tflops"] == 2.0
    assert summary["all"]["paired_slow_ms_over_fast_ms"] == 4.0  # median of 4, 3 and 5
    assert summary["uncontended"]["paired_slow_ms_over_fast_ms"] == 4.5  # median of 4 and 5
    assert summary["uncontended"]["slow_ms"] == 450.0


def test_rounds_wait_for_a_fast_probe_when_asked(cpu_checks, monkeypatch, capsys):
    readings = iter([0.5, 0.7, 1.8, 1.9, 2.0, 0.6, 1.7, 1.6, 0.4])
    monkeypatch.setattr(cpu_checks.speed_phases, "speed_probe", lambda: next(readings))
    timed = []

    def measure(name: str) -> dict:
        timed.append(name)
        return {f"{name}_ms": 1.0}

    rounds = cpu_checks._probed_rounds(2, ["a", "b"], measure, wait_for=1.5)
    # each round starts on the first probe at 1.5 or more; the probes after its timings are kept as read
    assert [r["probes"] for r in rounds] == [[1.8, 1.9, 2.0], [1.7, 1.6, 0.4]]
    assert all(r["waited_s"] >= 0 for r in rounds)
    assert timed == ["a", "b", "a", "b"]
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert [r["round"] for r in cpu_checks._uncontended(rounds)] == [0]

    readings = iter([0.5, 0.7, 1.8])  # not asked to wait: the first probe is the round's
    (record,) = cpu_checks._probed_rounds(1, ["a", "b"], measure)
    assert record["probes"] == [0.5, 0.7, 1.8] and "waited_s" not in record


def test_no_round_starts_after_the_minutes_given(cpu_checks, monkeypatch):
    import itertools

    monkeypatch.setattr(cpu_checks.speed_phases, "speed_probe", lambda: 1.0)
    clock = itertools.count(0.0, 30.0)  # each reading of the clock 30 s later than the last
    monkeypatch.setattr(cpu_checks.time, "perf_counter", lambda: next(clock))
    rounds = cpu_checks._probed_rounds(10, ["a"], lambda name: {"a_ms": 1.0}, minutes=1)
    assert [r["round"] for r in rounds] == [0, 1]  # started at 30 and 60 s; the third would start at 90 s
