"""ActiveClock: pauses (kill -STOP) are left out of measured seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from polypseg.core.clock import ActiveClock, Stopwatch


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def ticking(clock: ActiveClock, fake: FakeTime, seconds: float, tick: float = 0.5) -> None:
    """Let ``seconds`` pass with the clock's thread ticking every ``tick``."""
    for _ in range(round(seconds / tick)):
        fake.t += tick
        clock.tick()


def test_running_time_is_counted_and_a_pause_is_not() -> None:
    fake = FakeTime()
    clock = ActiveClock(clock=fake, tick_s=0.5, gap_s=5.0, start_thread=False)
    start = clock.now()
    ticking(clock, fake, 10.0)
    assert clock.now() - start == pytest.approx(10.0)
    assert clock.paused() == 0.0
    fake.t += 3600.0  # stopped for an hour: no ticks
    ticking(clock, fake, 2.0)
    # the first tick after the pause sees a gap of 3600.5 s, one ordinary tick of it running time
    assert clock.paused() == pytest.approx(3600.0)
    assert clock.now() - start == pytest.approx(12.0)


def test_a_gap_below_the_threshold_is_running_time() -> None:
    fake = FakeTime()
    clock = ActiveClock(clock=fake, tick_s=0.5, gap_s=5.0, start_thread=False)
    start = clock.now()
    fake.t += 4.0  # a slow tick under load, not a pause
    clock.tick()
    assert clock.paused() == 0.0
    assert clock.now() - start == pytest.approx(4.0)


def test_now_counts_a_pause_that_the_thread_has_not_seen_yet() -> None:
    fake = FakeTime()
    clock = ActiveClock(clock=fake, tick_s=0.5, gap_s=5.0, start_thread=False)
    start = clock.now()
    fake.t += 100.0
    assert clock.now() - start == pytest.approx(0.5)


def test_stopwatch_record_names_the_pause_only_when_there_was_one() -> None:
    fake = FakeTime()
    clock = ActiveClock(clock=fake, tick_s=0.5, gap_s=5.0, start_thread=False)
    watch = Stopwatch(clock)
    ticking(clock, fake, 3.0)
    assert watch.record() == {"seconds": 3.0}
    fake.t += 60.0
    ticking(clock, fake, 1.0)
    assert watch.record() == {"seconds": 4.0, "paused_seconds": 60.0}


def test_gap_must_exceed_tick() -> None:
    with pytest.raises(ValueError, match="gap_s"):
        ActiveClock(tick_s=1.0, gap_s=1.0, start_thread=False)


CHILD = """
import sys, time
from polypseg.core.clock import ActiveClock, Stopwatch
clock = ActiveClock(tick_s=0.1, gap_s=1.0)
watch = Stopwatch(clock)
print("ready", flush=True)
sys.stdin.readline()  # the parent stops and continues this process, then writes a line
print(watch.paused_seconds(), watch.seconds(), flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")
def test_a_real_sigstop_is_measured_as_a_pause() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(2.5)
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        paused, seconds = map(float, child.stdout.readline().split())
    finally:
        child.kill()
        child.wait()
    # Load can only add detected pauses, never hide this one: a lower bound is all that is certain.
    assert paused >= 2.5 - 0.1 - 0.05


def test_without_a_live_ticking_thread_long_gaps_are_running_time() -> None:
    """A dead ticker (or a forked child, which has none) must not turn every long epoch into a pause."""
    fake = FakeTime()
    clock = ActiveClock(clock=fake, tick_s=0.5, gap_s=5.0, start_thread=False)
    clock._thread = threading.Thread(target=lambda: None)
    clock._thread.start()
    clock._thread.join()
    start = clock.now()
    fake.t += 100.0
    assert clock.paused() == 0.0 and clock.now() - start == pytest.approx(100.0)


def test_patching_time_sleep_does_not_stop_the_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(seconds: float) -> None:
        raise AssertionError("time.sleep called")

    monkeypatch.setattr(time, "sleep", refuse)
    clock = ActiveClock(tick_s=0.01, gap_s=1.0)
    seen, deadline = {clock._last}, time.monotonic() + 10
    while len(seen) < 4 and time.monotonic() < deadline:  # only the thread's own ticks move _last
        threading.Event().wait(0.01)
        seen.add(clock._last)
    assert len(seen) >= 4, "the ticking thread stopped"
    assert clock._thread is not None and clock._thread.is_alive()
