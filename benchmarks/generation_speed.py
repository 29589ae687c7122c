"""Per-token generation latency against context length: recurrent linear decoding
versus a softmax decoder of the same size with a K/V cache, and without a cache.

Same process, same model size (`--hidden-dim`, `--num-layers`, 4 heads, vocab
256), batch `--batch`, float32, median of `--repeats` steps after warm-up.

- linear: `RecurrentLM.step` (XLA) after prefilling `context` tokens;
- softmax + K/V cache: an XLA step built on the same `keras.layers.
  MultiHeadAttention` sublayers, attending over a cache of `context + 1` keys
  (as keras-hub's `CachedMultiHeadAttention` does); the cache holds zeros, which
  costs the same as real keys;
- softmax, no cache: one full forward pass over `context + 1` tokens per token
  (up to `--max-no-cache`).

Also records the process RSS before and after `--memory-steps` linear steps,
and the throughput of each decoder, `batch / step time` in tokens/s (every
sequence of the batch gets one token per step): run it at `--batch 1` and
`--batch 32` for the two ends of serving.

    python benchmarks/generation_speed.py [--contexts 256 1024 4096 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import median_seconds  # noqa: E402

from keras_linear_attention import RecurrentLM, build_causal_lm  # noqa: E402
from keras_linear_attention.blocks import LinearTransformerDecoder  # noqa: E402


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class CachedSoftmaxStep:
    """One decoding step of a softmax `build_causal_lm` model with a K/V cache."""

    def __init__(self, model: keras.Model):
        self.embed = model.get_layer("token_embedding")
        self.positions = model.get_layer("position_embedding")
        self.blocks = [x for x in model.layers if isinstance(x, LinearTransformerDecoder)]
        self.norm, self.head = model.get_layer("final_norm"), model.get_layer("lm_head")
        self.step = tf.function(self._step, jit_compile=True)

    def empty_cache(self, batch: int, length: int) -> list:
        mha = self.blocks[0]._self_attention
        shape = (batch, length, mha.num_heads, mha.key_dim)
        return [tf.zeros(shape) for _ in range(2 * len(self.blocks))]

    def _cached_attention(self, mha, x, k_cache, v_cache, index):
        q = mha._query_dense(x)  # (B, 1, H, D)
        # Write this token's key and value in place, as keras-hub's cache does.
        start = [0, index, 0, 0]
        k_cache = keras.ops.slice_update(k_cache, start, mha._key_dense(x))
        v_cache = keras.ops.slice_update(v_cache, start, mha._value_dense(x))
        scores = tf.einsum("bqhd,bkhd->bhqk", q, k_cache) / float(mha.key_dim) ** 0.5
        visible = tf.range(tf.shape(k_cache)[1]) <= index
        scores = tf.where(visible, scores, -1e9)
        out = tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(scores), v_cache)
        return mha._output_dense(out), k_cache, v_cache

    def _step(self, token, caches, index):
        x = self.embed(token[:, None])
        x = x + self.positions(x, start_index=index)
        new = []
        for i, block in enumerate(self.blocks):
            h = block._self_attention_norm(x)
            attn, k, v = self._cached_attention(
                block._self_attention, h, caches[2 * i], caches[2 * i + 1], index
            )
            x = x + attn
            x = x + block._feedforward(block._feedforward_norm(x))
            new += [k, v]
        return self.head(self.norm(x))[:, 0], new


def plot(results: dict, path: str) -> None:
    """Per-token latency against context, log-log, one line per decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {
        "linear_ms": "linear, recurrent state",
        "softmax_cache_ms": "softmax, K/V cache",
        "softmax_no_cache_ms": "softmax, no cache",
    }
    for key, label in labels.items():
        points = [(r["context"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="context length (tokens)",
        ylabel="ms per generated token",
        title=f"Decoding latency, batch {rows[0]['batch']}, 2-core CPU",
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-no-cache", type=int, default=4096)
    p.add_argument("--memory-steps", type=int, default=2000)
    p.add_argument("--json")
    p.add_argument("--png", help="plot latency against context here")
    p.add_argument("--replot", help="only plot this earlier --json file into --png")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.png)
        return []
    keras.utils.set_random_seed(0)
    longest = max(args.contexts) + args.memory_steps + 2
    make = lambda attention: build_causal_lm(
        256,
        sequence_length=longest,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=4,
        attention=attention,
    )
    linear, softmax = RecurrentLM(make("linear")), make("softmax")
    cached = CachedSoftmaxStep(softmax)
    full = tf.function(lambda t: softmax(t, training=False)[:, -1])
    token = tf.ones((args.batch,), tf.int32)
    rows = []
    for context in args.contexts:
        _, states = linear.prefill(tf.ones((args.batch, context), tf.int32))
        index = tf.constant(context, tf.int32)
        row = {"context": context, "batch": args.batch}
        row["linear_ms"] = 1000 * median_seconds(
            lambda s=states, i=index: linear.step(token, s, i), args.repeats
        )
        caches = cached.empty_cache(args.batch, context + 1)
        row["softmax_cache_ms"] = 1000 * median_seconds(
            lambda c=caches, i=index: cached.step(token, c, i), args.repeats
        )
        if context <= args.max_no_cache:
            tokens = tf.ones((args.batch, context + 1), tf.int32)
            row["softmax_no_cache_ms"] = 1000 * median_seconds(
                lambda t=tokens: full(t), max(3, args.repeats // 5)
            )
        # Throughput: every sequence of the batch gets one token per step.
        for kind in ("linear", "softmax_cache"):
            row[f"{kind}_tokens_per_s"] = 1000 * args.batch / row[f"{kind}_ms"]
        rows.append(row)
        ratios = {
            k: row[k] / row["linear_ms"] for k in row if k.endswith("_ms") and k != "linear_ms"
        }
        print(
            f"context {context:>6}: linear {row['linear_ms']:.2f} ms/token; "
            + ", ".join(f"{k} {row[k]:.1f} ms ({r:.1f}x)" for k, r in ratios.items())
            + f"; {row['linear_tokens_per_s']:.0f} vs {row['softmax_cache_tokens_per_s']:.0f} "
            "tokens/s (linear vs cached softmax)",
            flush=True,
        )
    before = _rss_mb()
    for i in range(args.memory_steps):
        _, states = linear.step(token, states, tf.constant(max(args.contexts) + i, tf.int32))
    memory = {"rss_mb_before": before, "rss_mb_after": _rss_mb(), "steps": args.memory_steps}
    print(
        f"RSS before/after {args.memory_steps} linear steps: "
        f"{memory['rss_mb_before']:.0f} / {memory['rss_mb_after']:.0f} MB"
    )
    first, last = rows[0], rows[-1]
    ratio = last["linear_ms"] / first["linear_ms"]
    print(f"linear per-token latency at {last['context']} / at {first['context']}: {ratio:.2f}x")
    results = {"args": vars(args), "rows": rows, "memory": memory}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.png:
        plot(results, args.png)
    return rows


if __name__ == "__main__":
    main()
