"""Elapsed time that leaves out the stretches when the process was stopped.

Long CPU runs get paused on purpose (``kill -STOP`` / ``kill -CONT`` while a benchmark or the test
suite needs the cores, or a suspended laptop), and a plain monotonic clock then reports an epoch of
two minutes as two hours. :class:`ActiveClock` ticks on a daemon thread: a stopped process stops all
of its threads, so a gap between ticks far longer than the tick can only be a pause (scheduling
delays under load are milliseconds, not seconds) and is counted as such.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

TICK_S = 0.5
PAUSE_GAP_S = 5.0  # a gap between ticks longer than this is a pause, not a scheduling delay


class ActiveClock:
    """Monotonic seconds minus the time the process spent stopped.

    ``now()`` is comparable only with other ``now()`` values of the same clock; ``paused()`` is the
    total pause seen so far. ``start_thread=False`` (tests) leaves the ticking to :meth:`tick`.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = TICK_S,
        gap_s: float = PAUSE_GAP_S,
        start_thread: bool = True,
    ) -> None:
        if gap_s <= tick_s:
            raise ValueError(f"gap_s ({gap_s}) must exceed tick_s ({tick_s})")
        self._clock, self._tick_s, self._gap_s = clock, tick_s, gap_s
        self._lock = threading.Lock()
        self._last = clock()
        self._paused = 0.0
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name="polypseg-active-clock", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # Event.wait, not time.sleep: code that patches time.sleep (tests do) must not stop the ticks.
        wake = threading.Event()
        while not wake.wait(self._tick_s):
            self.tick()

    def tick(self) -> float:
        """Account the time since the last tick (a pause if it exceeds the gap); return the raw time."""
        with self._lock:
            now = self._clock()
            gap = now - self._last
            # Without a live ticking thread (it died, or this is a forked child), a long gap is
            # ordinary running time: only counted ticks can tell a pause.
            ticking = self._thread is None or self._thread.is_alive()
            if gap > self._gap_s and ticking:
                self._paused += gap - self._tick_s  # one tick of it was ordinary running time
            self._last = now
            return now

    def now(self) -> float:
        """Seconds on this clock: the monotonic time less every pause seen so far."""
        raw = self.tick()  # a pause that just ended counts even before the thread notices it
        with self._lock:
            return raw - self._paused

    def paused(self) -> float:
        """Seconds the process has been seen stopped since the clock started."""
        self.tick()
        with self._lock:
            return self._paused


_shared: ActiveClock | None = None
_shared_lock = threading.Lock()


def active_clock() -> ActiveClock:
    """The process's one :class:`ActiveClock`, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ActiveClock()
        return _shared


class Stopwatch:
    """Active and paused seconds since it was made, on the shared clock."""

    def __init__(self, clock: ActiveClock | None = None) -> None:
        self._clock = clock or active_clock()
        self._active0, self._paused0 = self._clock.now(), self._clock.paused()

    def seconds(self) -> float:
        """Seconds the process ran (pauses left out)."""
        return self._clock.now() - self._active0

    def paused_seconds(self) -> float:
        """Seconds the process was stopped."""
        return self._clock.paused() - self._paused0

    def record(self, digits: int = 3) -> dict[str, float]:
        """``{"seconds": ...}``, plus ``"paused_seconds"`` when the process was stopped meanwhile."""
        seconds, paused = round(self.seconds(), digits), round(self.paused_seconds(), digits)
        return {"seconds": seconds, **({"paused_seconds": paused} if paused > 0 else {})}
