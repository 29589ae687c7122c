"""The timing loop shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import numpy as np
import tensorflow as tf


def median_seconds(fn, repeats: int) -> float:
    """Call `fn` once to trace and warm up, then return the median wall time of
    `repeats` calls, each waited for by fetching its outputs as NumPy."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(np.asarray, fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)
