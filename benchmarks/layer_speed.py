"""Forward+backward time of our layers against keras.layers.MultiHeadAttention.

Same process, same shapes (model dim 512, 8 heads of 64, batch 1, float32),
warm-up then the median of `--repeats` runs; prints ratios to Keras MHA.
Issue 3 extends this into the full suite (separate processes, memory, plots).

    python benchmarks/layer_speed.py --lengths 512 1024 4096 --jit
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import median_seconds  # noqa: E402

import keras_linear_attention as kla  # noqa: E402


def _configs(heads: int, key_dim: int) -> dict:
    mha = lambda: keras.layers.MultiHeadAttention(heads, key_dim)  # noqa: E731
    lin = lambda: kla.LinearMultiHeadAttention(heads, key_dim)  # noqa: E731
    return {
        "keras_mha_causal": (mha, lambda layer, x: layer(x, x, use_causal_mask=True)),
        "linear_causal": (lin, lambda layer, x: layer(x, x, use_causal_mask=True)),
        "linear_noncausal": (lin, lambda layer, x: layer(x, x)),
        "causal_linear_attention": (
            lambda: kla.CausalLinearAttention(heads, key_dim),
            lambda layer, x: layer(x),
        ),
    }


def time_config(make, apply, n: int, dim: int, repeats: int, jit: bool) -> float:
    """Median seconds of one forward+backward pass (inputs and weights)."""
    layer = make()
    x = tf.random.normal((1, n, dim))
    apply(layer, x)

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(apply(layer, x))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    return median_seconds(lambda: step(x), repeats)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--jit", action="store_true", help="XLA-compile the step")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    results = []
    for n in args.lengths:
        row = {"n": n, "jit": args.jit}
        for name, (make, apply) in _configs(args.heads, args.dim // args.heads).items():
            row[name] = time_config(make, apply, n, args.dim, args.repeats, args.jit)
        base = row["keras_mha_causal"]
        print(
            f"N={n:>6}  keras MHA causal {base * 1e3:8.1f} ms | "
            + " | ".join(
                f"{k} {row[k] * 1e3:7.1f} ms ({base / row[k]:.2f}x)"
                for k in row
                if k not in ("n", "jit", "keras_mha_causal")
            ),
            flush=True,
        )
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
