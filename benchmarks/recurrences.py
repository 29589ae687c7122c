"""Speed and memory of the decayed, gated and delta recurrences against "linear".

    python benchmarks/recurrences.py [--quick] [--parts long ...] \
        [--json benchmarks/results/recurrences.json]

Measures, each target in one run (the issue's shapes: B = 1, 8 heads of 64,
model dim 512, float32, forward+backward, default graph mode without XLA):

1. Layer time of every recurrence at N = 4096 and 16384, timed in
   alternation with `recurrence="linear"` in one process; ratio per round.
2. `"gated_delta"` at N = 65536 alone in a fresh process (its peak RSS),
   and its time against N = 4096 alternated in another (ratio per round).
3. Per-token `RecurrentLM.step` latency after a context of 256 and of 16384
   tokens, for a 2-block LM of each recurrence (width 512, 8 heads),
   alternated in one process; ratio per round.
4. keras-hub's Qwen3.5 `_chunk_gated_delta_rule` beside `delta_rule_attention`
   on the same inputs at N = 1024 and 4096 (forward), and their largest
   difference (keras-hub L2-normalises q and k and scales q by 1/√d inside;
   ours gets the same prepared inputs). Skipped, saying so, without keras-hub.

`--quick` shrinks every length (for the smoke test); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _process import HEADS, KEY_DIM, MODEL_DIM, peak_rss_mib  # noqa: E402
from _timing import interleaved, timed  # noqa: E402

import keras_linear_attention as kla  # noqa: E402

PARTS = ["layers", "long", "step", "keras_hub"]
RECURRENCES = ["linear", "retention", "gated", "delta", "gated_delta"]
LIMITS = {"retention": 1.3, "gated": 1.3, "delta": 2.5, "gated_delta": 2.5}


def _train_step(recurrence: str, n: int):
    """A fetched forward+backward call of one `CausalLinearAttention`."""
    layer = kla.CausalLinearAttention(HEADS, KEY_DIM, recurrence=recurrence)
    x = tf.random.normal((1, n, MODEL_DIM), seed=0)
    layer(x[:, :8])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, [x, *layer.trainable_weights])

    return lambda: [g.numpy() for g in step(x)]


def layer_ratios(lengths: list[int], rounds: int) -> dict:
    results = {}
    for n in lengths:
        fns = {r: _train_step(r, n) for r in RECURRENCES}
        measured = interleaved(fns, rounds=rounds, budget_s=120)
        results[n] = measured
        for r in RECURRENCES[1:]:
            ratio = measured["ratio_to_first"][r]
            print(
                f"N={n:>6} {r:<12} {1e3 * measured['seconds'][r]:8.1f} ms  "
                f"{ratio:5.2f}x linear ({1e3 * measured['seconds']['linear']:.1f} ms)"
                f"  limit {LIMITS[r]}x  {'met' if ratio <= LIMITS[r] else 'NOT met'}",
                flush=True,
            )
    return results


def long_sequence(short: int, long: int) -> dict:
    """`gated_delta` at `long` tokens alone in a fresh process (its peak RSS),
    then timed against `short` tokens in another."""
    result = {"peak_rss_mib": _in_fresh_process(f"_peak_memory({long})")}
    result.update(_in_fresh_process(f"_time_ratio({short}, {long})"))
    print(
        f"gated_delta N={long}: {result['long_s']:.2f} s, {result['ratio']:.1f}x N={short} "
        f"(limit 18x), peak RSS {result['peak_rss_mib']:.0f} MiB (limit 4096)",
        flush=True,
    )
    return result


def _in_fresh_process(call: str):
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import recurrences as r; "
        f"print('RESULT ' + json.dumps(r.{call}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def _peak_memory(long: int) -> float:
    timed(_train_step("gated_delta", long), repeats=1, budget_s=0)
    return peak_rss_mib()


def _time_ratio(short: int, long: int, rounds: int = 9) -> dict:
    # Alternated in one process, the ratio taken per round: this machine's
    # speed drifts by more than the margin being measured (separate timings
    # of the same code, one process each: 15.8x and 21.4x).
    fns = {"short": _train_step("gated_delta", short), "long": _train_step("gated_delta", long)}
    measured = interleaved(fns, rounds=rounds, budget_s=120)
    return {
        "short_s": measured["seconds"]["short"],
        "long_s": measured["seconds"]["long"],
        "ratio": measured["ratio_to_first"]["long"],
        "rounds": measured["rounds"],
    }


def _decode_call(runner, context: int, steps: int):
    """A call that decodes `steps` tokens after a `context`-token prompt."""
    prompt = np.random.default_rng(0).integers(0, 256, (1, context))
    _, states = runner.prefill(prompt)
    token = np.array([1], np.int32)

    def decode():
        current = states
        for i in range(steps):
            logits, current = runner.step(token, current, context + i)
        np.asarray(logits)

    return decode


def step_latency(contexts: list[int], steps: int) -> dict:
    results = {}
    for r in RECURRENCES:
        model = kla.build_causal_lm(
            256, hidden_dim=MODEL_DIM, num_layers=2, num_heads=HEADS, attention=r, position="none"
        )
        runner = kla.RecurrentLM(model)
        # Alternated, ratio per round: separate timings of the same
        # constant-size step differed by up to 1.28x.
        fns = {c: _decode_call(runner, c, steps) for c in contexts}
        measured = interleaved(fns, rounds=5, budget_s=20)
        per_context = {c: s / steps for c, s in measured["seconds"].items()}
        ratio = measured["ratio_to_first"][contexts[-1]]
        print(
            f"step {r:<12} "
            + "  ".join(f"ctx {c}: {1e3 * s:.2f} ms" for c, s in per_context.items())
            + f"  ratio {ratio:.2f} (limit 1.3)",
            flush=True,
        )
        results[r] = {"ms_per_token": {c: 1e3 * s for c, s in per_context.items()}, "ratio": ratio}
    return results


def keras_hub_comparison(lengths: list[int]) -> dict:
    try:
        from keras_hub.src.models.qwen3_5.qwen3_5_gated_delta_net import (
            _chunk_gated_delta_rule,
        )
    except ImportError as err:
        print(f"keras-hub comparison skipped: {err} (pip install keras-hub)", flush=True)
        return {"skipped": str(err)}
    results = {}
    for n in lengths:
        results[n] = _compare_with_keras_hub(_chunk_gated_delta_rule, n)
    return results


def _compare_with_keras_hub(hub_op, n: int) -> dict:
    rng = np.random.default_rng(0)
    q, k = (rng.normal(size=(1, n, HEADS, KEY_DIM)).astype("float32") for _ in range(2))
    v = rng.normal(size=(1, n, HEADS, KEY_DIM)).astype("float32")
    g = np.log(rng.uniform(0.9, 1.0, (1, n, HEADS))).astype("float32")
    beta = rng.uniform(0, 1, (1, n, HEADS)).astype("float32")
    unit = lambda x: x / np.sqrt(np.sum(x**2, -1, keepdims=True) + 1e-6)
    ours = tf.function(lambda *a: kla.ops.delta_rule_attention(*a))
    hub = tf.function(lambda *a: hub_op(*a)[0])
    # keras-hub normalises q and k and scales q by 1/sqrt(d) itself.
    ours_in = (unit(q) / np.sqrt(KEY_DIM), unit(k), v, beta, g)
    diff = float(np.max(np.abs(ours(*ours_in) - hub(q, k, v, g, beta))))
    measured = interleaved(
        {
            "ours": lambda: np.asarray(ours(*ours_in)),
            "keras_hub": lambda: np.asarray(hub(q, k, v, g, beta)),
        },
        rounds=7,
        budget_s=60,
    )
    print(
        f"keras-hub N={n}: ours {1e3 * measured['seconds']['ours']:.1f} ms, keras-hub "
        f"{1e3 * measured['seconds']['keras_hub']:.1f} ms "
        f"(keras-hub / ours {measured['ratio_to_first']['keras_hub']:.2f}), "
        f"max |difference| {diff:.1e}",
        flush=True,
    )
    return {**measured, "max_abs_difference": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, help="measure only these (default: all)"
    )
    args = parser.parse_args()
    scale = 64 if args.quick else 1
    parts = {
        "layers": lambda: layer_ratios(
            [4096 // scale, 16384 // scale], rounds=3 if args.quick else 7
        ),
        "long": lambda: long_sequence(4096 // scale, 65536 // scale),
        "step": lambda: step_latency([256 // scale, 16384 // scale], steps=4 if args.quick else 32),
        "keras_hub": lambda: keras_hub_comparison([1024 // scale, 4096 // scale]),
    }
    chosen = args.parts or list(parts)
    start = time.time()
    results = {"processor": _processor(), **{part: parts[part]() for part in chosen}}
    results["seconds"] = time.time() - start
    if args.json:
        _write(args.json, results, partial=bool(args.parts))


def _write(path: str, results: dict, partial: bool) -> None:
    """Write `results`; a run of some `--parts` replaces only those parts
    of an existing file (and records when each part was measured)."""
    stamp = time.strftime("%Y-%m-%d")
    results["measured"] = {part: stamp for part in results if part in PARTS}
    if partial and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        results = {**old, **results, "measured": {**old.get("measured", {}), **results["measured"]}}
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


def _processor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
