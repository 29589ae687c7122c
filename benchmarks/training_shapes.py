"""Attention layers at the shapes users train: forward+backward against Keras MHA.

    python benchmarks/training_shapes.py             # full run, about 10 minutes
    python benchmarks/training_shapes.py --quick --out /tmp/t.json   # CI smoke

B = 32, model dim 256, 4 heads of 64, float32, N in {32, ..., 1024}, causal
(`use_causal_mask=True`) and not, in graph mode without XLA (Keras's CPU
default) and with XLA. Per configuration every implementation is timed in
alternation in one process (`_timing.interleaved`, Keras MHA first), so
machine noise hits all alike; ratios are medians over rounds. Implementations:

- `keras_mha`: `keras.layers.MultiHeadAttention` (softmax, the baseline);
- `ours`: `LinearMultiHeadAttention` as shipped (short-sequence path chosen
  by length, `short_sequence_threshold=None`);
- `ours_chunked`: the same, `short_sequence_threshold=0` (never the short
  path: the chunked causal algorithm / the global `(D, M)` sums);
- `ours_quadratic`: the short path forced at every length (the explicit
  T×S kernel matrix); with `ours_chunked`, the measurement behind the
  default thresholds.

Under `KERAS_BACKEND=jax` the same rows run as `jax.jit(jax.grad(...))` of
the layer's stateless call (JAX has no graph mode without XLA) and go to
`training_shapes_jax.json`.

"MHA/x" is Keras MHA's time over x's: above 1, x is faster. `--quick`
shrinks every size (for the smoke test); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import interleaved  # noqa: E402

import keras_linear_attention as kla  # noqa: E402

HERE = Path(__file__).resolve().parent
LENGTHS = [32, 64, 128, 256, 512, 1024]
IMPLS = ["keras_mha", "ours", "ours_chunked", "ours_quadratic"]
FULL = dict(batch=32, model_dim=256, heads=4, key_dim=64)
QUICK = dict(batch=2, model_dim=16, heads=2, key_dim=8)
# Under KERAS_BACKEND=jax the same rows run through jax.jit(jax.grad(...)).
JAX = keras.backend.backend() == "jax"
SUFFIX = "_jax" if JAX else ""
# A threshold no sequence reaches: the short path at every length.
ALWAYS = 1 << 30


def _layer(impl: str, heads: int, key_dim: int) -> keras.layers.Layer:
    if impl == "keras_mha":
        return keras.layers.MultiHeadAttention(heads, key_dim)
    threshold = {"ours": None, "ours_chunked": 0, "ours_quadratic": ALWAYS}[impl]
    return kla.LinearMultiHeadAttention(heads, key_dim, short_sequence_threshold=threshold)


def train_step(impl: str, n: int, causal: bool, jit: bool, shapes: dict):
    """A call that runs one forward+backward pass (input and weight
    gradients) of a fresh layer and waits for the result."""
    layer = _layer(impl, shapes["heads"], shapes["key_dim"])
    x = np.random.default_rng(0).normal(size=(shapes["batch"], n, shapes["model_dim"]))
    x = x.astype("float32")
    layer(x[:, :2], x[:, :2])  # build
    if JAX:
        return _jax_train_step(layer, x, causal)
    return _tf_train_step(layer, tf.constant(x), causal, jit)


def _jax_train_step(layer: keras.layers.Layer, x, causal: bool):
    """`jax.grad` of the stateless call, under `jax.jit` (JAX's only sensible
    mode: without it every op dispatches eagerly)."""
    import jax

    def loss(trainable, x):
        out, _ = layer.stateless_call(trainable, [], x, x, use_causal_mask=causal)
        return jax.numpy.sum(out)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    weights = [v.value for v in layer.trainable_variables]
    x = jax.numpy.asarray(x)
    return lambda: jax.block_until_ready(step(weights, x))


def _tf_train_step(layer: keras.layers.Layer, x, causal: bool, jit: bool):
    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, x, use_causal_mask=causal))
        return tape.gradient(loss, [x, *layer.trainable_weights])

    return lambda: [g.numpy() for g in step(x)]


def measure(args) -> list[dict]:
    shapes = QUICK if args.quick else FULL
    rows = []
    for jit in args.jit:
        for causal in (True, False):
            for n in args.lengths:
                fns = {i: train_step(i, n, causal, jit, shapes) for i in args.impls}
                timing = interleaved(fns, rounds=args.rounds, budget_s=args.budget_s)
                row = {
                    "n": n,
                    "causal": causal,
                    "jit": jit,
                    "ms": {i: 1e3 * s for i, s in timing["seconds"].items()},
                    # Median over rounds of impl / keras_mha, inverted.
                    "mha_over": {i: 1 / r for i, r in timing["ratio_to_first"].items()},
                    "rounds": timing["rounds"],
                }
                rows.append(row)
                _print_row(row, args.impls)
    return rows


def _print_row(row: dict, impls: list[str]) -> None:
    ms = "  ".join(f"{row['ms'][i]:8.1f}" for i in impls)
    ratios = "  ".join(f"{row['mha_over'][i]:6.2f}" for i in impls[1:])
    mode = "jax" if JAX else "xla" if row["jit"] else "graph"
    kind = "causal" if row["causal"] else "full"
    print(f"{mode:<5} {kind:<6} {row['n']:>5}  {ms}  {ratios}", flush=True)


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--jit", choices=["off", "on", "both"], default="both")
    p.add_argument("--rounds", type=int, default=7, help="rounds per configuration (>= 3)")
    p.add_argument("--budget-s", type=float, default=20.0, help="time per configuration")
    p.add_argument("--out", default=str(HERE / "results" / f"training_shapes{SUFFIX}.json"))
    args = p.parse_args(argv)
    if args.impls[0] != "keras_mha":
        p.error("--impls must start with keras_mha (the baseline of the ratios)")
    if args.lengths is None:
        args.lengths = [8, 16] if args.quick else LENGTHS
    args.jit = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    if JAX:
        args.jit = [True]  # JAX rows are XLA rows (--jit is TensorFlow's choice)
    if args.quick:
        args.jit, args.rounds, args.budget_s = args.jit[:1], 1, 0.0
    shapes = QUICK if args.quick else FULL
    print(
        f"forward+backward ms, B={shapes['batch']}, dim {shapes['model_dim']}, "
        f"{shapes['heads']} heads of {shapes['key_dim']}; then MHA time / ours",
        flush=True,
    )
    print(f"{'mode':<5} {'mask':<6} {'N':>5}  " + "  ".join(f"{i:>8.8}" for i in args.impls))
    start = time.perf_counter()
    rows = measure(args)
    report = {
        "machine": machine(),
        "shapes": shapes,
        "impls": args.impls,
        "thresholds": {
            "causal": kla.ops.causal.DEFAULT_SHORT_SEQUENCE_THRESHOLD,
            "noncausal": kla.ops.noncausal.DEFAULT_SHORT_SEQUENCE_THRESHOLD,
        },
        "results": rows,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(out)
    return report


def plot(run: Path) -> Path:
    """`training_shapes.png` beside `run`, from it and the other backend's
    run in the same folder (`training_shapes.json`, `training_shapes_jax.json`)."""
    import figures

    folder = run.parent
    runs = {run.resolve()} | {
        p.resolve()
        for p in (folder / "training_shapes.json", folder / "training_shapes_jax.json")
        if p.exists()
    }
    reports = [json.loads(p.read_text()) for p in sorted(runs)]
    figures.training_shapes_figure(reports, folder / "training_shapes.png")
    return folder / "training_shapes.png"


if __name__ == "__main__":
    sys.exit(main() and 0)
