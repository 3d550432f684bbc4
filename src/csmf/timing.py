"""The one way csmf times code for its benchmarks: a warm-up run, then the median of repeats."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `fn` over `repeats` runs, after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
