"""Run ONE benchmark configuration and print its result as one JSON line.

The suite (`suite.py`) starts a fresh process per configuration, so the peak
memory reported here (`ru_maxrss`) belongs to that configuration alone.
A memory cap (`RLIMIT_AS`) turns runaway allocations, e.g. softmax's N×N
scores, into a recorded "out of memory" result instead of a swapping machine.

    python benchmarks/bench_config.py '{"kind": "layer", "impl": "linear_causal",
        "n": 4096, "jit": false}'

Kinds:
- layer: a whole attention layer (model dim 512, 8 heads of 64, batch 1);
  impls keras_mha, keras_mha_causal, linear, linear_causal (both
  `LinearMultiHeadAttention`), causal_layer (`CausalLinearAttention`),
  retention_layer, gated_layer, delta_layer, gated_delta_layer (the same
  with that `recurrence`) and projections (the four `EinsumDense` projections alone: the floor).
- core: the attention math alone on feature-mapped inputs (B=1, H=8,
  D=M=64); impls causal, noncausal, softmax_causal. Also measures a
  4096² float32 matmul in the same process as the FLOP-rate yardstick.
- fit: `model.fit` steps of a small causal LM, with or without XLA.
- pair: two or more layer impls (`"impls"`, the baseline first), forward+
  backward, timed in alternation in this one process; the targets that are
  ratios between two layers are read from these (machines are noisy, and
  separate processes differ by up to 30% here).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _process import HEADS, KEY_DIM, MODEL_DIM, main, peak_rss_mib  # noqa: E402
from _timing import interleaved, timed  # noqa: E402
from keras import ops  # noqa: E402

import keras_linear_attention as kla  # noqa: E402


def _fetched(fn, *args):
    """`fn(*args)` as a call that waits for its result (fetched as NumPy)."""
    return lambda: tf.nest.map_structure(np.asarray, fn(*args))


def _timed(fn, repeats: int, budget_s: float) -> dict:
    return timed(_fetched(fn), repeats, budget_s)


def _grad_fn(apply, variables, jit: bool, backward: bool):
    """A tf.function of the forward pass, or of input and weight gradients."""

    @tf.function(jit_compile=jit)
    def run(*inputs):
        if not backward:
            return apply(*inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(apply(*inputs))
        return tape.gradient(loss, [*inputs, *variables])

    return run


def _layer(cfg: dict):
    impl = cfg["impl"]
    if impl == "projections":
        layer = _Projections()
        apply = lambda x: layer(x)
    elif impl == "causal_layer" or impl.endswith("_layer"):
        recurrence = "linear" if impl == "causal_layer" else impl.removesuffix("_layer")
        layer = kla.CausalLinearAttention(
            HEADS, KEY_DIM, chunk_size=cfg.get("chunk", 64), recurrence=recurrence
        )
        apply = lambda x: layer(x)
    else:
        cls = keras.layers.MultiHeadAttention if impl.startswith("keras") else None
        cls = cls or (
            lambda h, d: kla.LinearMultiHeadAttention(h, d, chunk_size=cfg.get("chunk", 64))
        )
        layer = cls(HEADS, KEY_DIM)
        causal = impl.endswith("_causal")
        apply = lambda x: layer(x, x, use_causal_mask=causal)
    x = tf.random.normal((1, cfg["n"], MODEL_DIM))
    apply(x)
    return apply, layer.trainable_variables, (x,)


class _Projections:
    """The four projections of a 512-wide, 8×64-head attention layer."""

    def __init__(self):
        dense = lambda eq, shape: keras.layers.EinsumDense(eq, shape)
        self.q, self.k, self.v = (dense("abc,cde->abde", (None, HEADS, KEY_DIM)) for _ in "qkv")
        self.out = dense("abcd,cde->abe", (None, MODEL_DIM))

    def __call__(self, x):
        return self.out(self.q(x) + self.k(x) + self.v(x))

    @property
    def trainable_variables(self):
        return [w for layer in (self.q, self.k, self.v, self.out) for w in layer.trainable_weights]


def core_flops(impl: str, n: int, chunk: int, backward: bool) -> float:
    """Matmul FLOPs the implementation executes (backward counted as 2× forward).

    Causal: per chunk of C tokens and per head, φ(Q)φ(K)ᵀ (2C²D), its product
    with V (2C²M), φ(K)ᵀV (2CDM) and φ(Q)·prefix (2CDM). The masked upper
    half of the C×C block is executed, so it is counted.
    """
    d = m = KEY_DIM
    if impl == "causal":
        chunks = -(-n // chunk)
        fwd = HEADS * chunks * (2 * chunk * chunk * (d + m) + 4 * chunk * d * m)
    elif impl == "noncausal":
        fwd = HEADS * 4 * n * d * m
    else:
        fwd = HEADS * 2 * n * n * (d + m)
    return fwd * (3 if backward else 1)


def _core(cfg: dict):
    n, impl = cfg["n"], cfg["impl"]
    shape = (1, n, HEADS, KEY_DIM)
    q, k = (tf.nn.elu(tf.random.normal(shape)) + 1 for _ in "qk")
    v = tf.random.normal(shape)
    if impl == "causal":
        chunk = cfg.get("chunk", kla.ops.DEFAULT_CHUNK_SIZE)

        def apply(q, k, v):
            return kla.ops.causal_linear_attention(q, k, v, chunk_size=chunk)
    elif impl == "noncausal":
        apply = kla.ops.linear_attention
    else:

        def apply(q, k, v):
            scores = ops.einsum("bthd,bshd->bhts", q, k) / KEY_DIM**0.5
            scores = ops.where(ops.tril(ops.ones((n, n), "bool")), scores, -1e9)
            return ops.einsum("bhts,bshm->bthm", ops.softmax(scores, axis=-1), v)

    return apply, [], (q, k, v)


def _matmul_gflops() -> float:
    """FLOP rate of a 4096×4096 float32 matmul: this process's yardstick."""
    a = tf.random.normal((4096, 4096))
    f = tf.function(lambda a: a @ a)
    return 2 * 4096**3 / _timed(lambda: f(a), 5, 10)["seconds"] / 1e9


def _fit(cfg: dict):
    n, batch, steps = cfg["n"], 2, cfg.get("steps", 8)
    keras.utils.set_random_seed(0)
    model = kla.build_causal_lm(256, sequence_length=n, hidden_dim=256, num_layers=2, num_heads=4)
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=cfg["jit"]
    )
    tokens = np.random.default_rng(0).integers(0, 256, (batch * steps, n + 1))
    times = _StepTimes()
    model.fit(
        tokens[:, :-1], tokens[:, 1:], batch_size=batch, epochs=2, verbose=0, callbacks=[times]
    )
    # Epoch 1 traces/compiles; the median step of epoch 2 is the result.
    return {"seconds": float(np.median(times.seconds[steps + 1 :])), "runs": steps - 1}


class _StepTimes:
    def __new__(cls):
        class StepTimes(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds, self._last = [], None

            def on_train_batch_end(self, batch, logs=None):
                now = time.perf_counter()
                if self._last is not None:
                    self.seconds.append(now - self._last)
                self._last = now

        return StepTimes()


def _measure_modes(cfg: dict, result: dict) -> None:
    """Forward, then forward+backward, in this process; peak memory after each
    (ru_maxrss only grows, so the forward figure excludes the backward)."""
    apply, variables, inputs = {"layer": _layer, "core": _core}[cfg["kind"]](cfg)
    for mode in ("fwd", "fwdbwd"):
        fn = _grad_fn(apply, variables, cfg["jit"], backward=mode == "fwdbwd")
        timing = _timed(lambda fn=fn: fn(*inputs), cfg.get("repeats", 3), cfg.get("budget_s", 20))
        timing["peak_rss_mib"] = peak_rss_mib()
        if cfg["kind"] == "core":
            chunk = cfg.get("chunk", kla.ops.DEFAULT_CHUNK_SIZE)
            timing["flops"] = core_flops(cfg["impl"], cfg["n"], chunk, mode == "fwdbwd")
            timing["gflops"] = timing["flops"] / timing["seconds"] / 1e9
        result[mode] = timing
    if cfg["kind"] == "core":
        result["matmul_gflops"] = _matmul_gflops()


def _pair(cfg: dict, result: dict) -> None:
    """Forward+backward of each of `cfg["impls"]`, interleaved (`interleaved`)."""
    fns = {}
    for impl in cfg["impls"]:
        apply, variables, inputs = _layer({**cfg, "impl": impl})
        fn = _grad_fn(apply, variables, cfg["jit"], backward=True)
        fns[impl] = _fetched(fn, *inputs)
    result["fwdbwd"] = interleaved(fns, 2 * cfg.get("repeats", 3) + 1, 2 * cfg.get("budget_s", 20))


def run(cfg: dict) -> dict:
    """Measure one configuration; running out of memory is a result, not a crash."""
    result = dict(cfg)
    try:
        if cfg["kind"] == "fit":
            result.update(_fit(cfg))
        elif cfg["kind"] == "pair":
            _pair(cfg, result)
        else:
            _measure_modes(cfg, result)
        result["status"] = "ok"
    except (tf.errors.ResourceExhaustedError, MemoryError) as err:
        result["status"] = f"out of memory ({type(err).__name__})"
    result["peak_rss_mib"] = peak_rss_mib()
    return result


if __name__ == "__main__":
    main(run)
