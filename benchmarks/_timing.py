"""The timing loops shared by the benchmark scripts (no TensorFlow import, so
the PyTorch baseline can use them in a process of its own)."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int, budget_s: float) -> dict:
    """Call `fn` once (trace, compile, warm up), then time up to `repeats`
    calls, stopping early once `budget_s` is spent so long configurations
    stay bounded. `fn` must wait for its result (fetch it to the host)."""
    start = time.perf_counter()
    fn()
    warmup = time.perf_counter() - start
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "runs": len(times), "warmup_seconds": warmup}


def median_seconds(fn, repeats: int) -> float:
    """Call `fn` once to trace and warm up, then return the median wall time of
    `repeats` calls, each waited for by fetching its outputs as NumPy."""
    import numpy as np
    import tensorflow as tf

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(np.asarray, fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)
