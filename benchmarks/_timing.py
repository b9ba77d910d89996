"""Timing helpers shared by the scripts in ``benchmarks/`` (imported as ``_timing``: a
script run as ``python benchmarks/NAME.py`` has this folder on its path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """The shortest wall-clock time of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
