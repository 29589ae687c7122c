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


def interleaved(fns: dict, rounds: int, budget_s: float) -> dict:
    """Time several functions against each other in one process: warm each
    up, then call each once per round, alternating the order, for up to
    `rounds` rounds (at least 3) or until `budget_s` is spent. Machine
    noise (clock, neighbours) then hits all of them alike, so their ratio
    is steadier than that of timings taken in separate processes.

    Returns each one's median seconds and, per name, the median over rounds
    of its time divided by the first function's in the same round."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict = {name: [] for name in names}
    spent = 0.0
    for round_ in range(max(rounds, 3)):
        if round_ >= 3 and spent >= budget_s:
            break
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
    first = times[names[0]]
    return {
        "seconds": {name: statistics.median(ts) for name, ts in times.items()},
        "ratio_to_first": {
            name: statistics.median(t / f for t, f in zip(ts, first, strict=True))
            for name, ts in times.items()
        },
        "rounds": len(first),
    }


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
