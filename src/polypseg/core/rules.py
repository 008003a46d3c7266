"""Value rules that every entry point shares: an option, a config field and a value read from a file
(a checkpoint's sidecar, a run's summary) are checked by the same function, so the command line can
never refuse a value that a file then gets used with.
"""

from __future__ import annotations

import math
from typing import Any

from polypseg.errors import PolypsegError

THRESHOLD_RULE = "a number strictly between 0 and 1"
IMAGE_SIZE_RULE = "a multiple of 32"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def threshold_problem(value: Any) -> str | None:
    """Why ``value`` is not a decision threshold, or None. At 0 every pixel is polyp, at 1 none is,
    and a value outside (0, 1) gives a constant mask without a word: refused everywhere."""
    if _is_number(value) and 0 < value < 1:
        return None
    return f"{value!r} is not {THRESHOLD_RULE}" if not _is_number(value) else f"{value:g} is not {THRESHOLD_RULE}"


def check_threshold(value: Any, label: str = "--threshold") -> float:
    """``value`` as a float, or a :class:`PolypsegError` naming ``label``."""
    problem = threshold_problem(value)
    if problem is not None:
        raise PolypsegError(f"{label} {problem}")
    return float(value)


def image_size_problem(value: Any) -> str | None:
    """Why ``value`` is not a model input size (the encoder halves it five times), or None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 32 and value % 32 == 0:
        return None
    return f"{value!r} is not {IMAGE_SIZE_RULE}"
