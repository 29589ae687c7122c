"""The short-sequence path (the explicit masked T×S kernel matrix) against the
float64 reference and the chunked / global path: forward and gradients, every
feature map, key padding, states, float16, lengths around the threshold."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode, prefill_then_steps
from reference import (
    causal_attention_with_state,
    elu_plus_one,
    kernel_attention,
    layer_reference,
    layer_weights,
    relu,
)

import keras_linear_attention as kla
from keras_linear_attention.ops import scores

H, D, M = 2, 4, 3
DIM, KEY_DIM = 6, 4
THRESHOLD = 8  # small, so lengths around it stay cheap
TOL = dict(rtol=1e-4, atol=2e-5)
NEVER, ALWAYS = 0, 1 << 20


def _inputs(rng, t, s=None, batch=2, dtype="float32", scale=1.0):
    s = t if s is None else s
    q = elu_plus_one(tf.constant(scale * rng.normal(size=(batch, t, H, D)), tf.float64))
    k = elu_plus_one(tf.constant(scale * rng.normal(size=(batch, s, H, D)), tf.float64))
    v = tf.constant(rng.normal(size=(batch, s, H, M)), tf.float64)
    return [tf.cast(x, dtype) for x in (q, k, v)]


def _padding(rng, batch, s):
    mask = rng.random((batch, s)) > 0.3
    mask[:, 0] = True
    return tf.constant(mask)


def _cotangent(t):
    wave = tf.cos(tf.range(tf.size(t), dtype=tf.float32) * 0.7)
    return tf.cast(tf.reshape(wave, tf.shape(t)), t.dtype)


def _values_and_grads(fn, *args):
    """Outputs of `fn(*args)` (a tensor or nested tuple) and the gradients of
    a loss with a fixed non-constant cotangent on every output."""
    with tf.GradientTape() as tape:
        tape.watch(args)
        outs = tf.nest.flatten(fn(*args))
        loss = sum(tf.reduce_sum(o * tf.cast(_cotangent(o), o.dtype)) for o in outs)
    return [*outs, *tape.gradient(loss, list(args))]


def _close(name, got, expected, tol=None):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_close(f"short path: {name} [{i}]", a, b, **(tol or TOL))


class _Spy:
    """Counts traces of the short path (`scores.quadratic_attention`)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = scores.quadratic_attention

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(scores, "quadratic_attention", spy)


# XLA at the threshold itself only: compiling the gradient takes seconds.
@pytest.mark.parametrize(
    "mode,n",
    [(m, n) for m in MODES[:2] for n in (THRESHOLD - 1, THRESHOLD, THRESHOLD + 1)]
    + [("xla", THRESHOLD)],
)
def test_causal_around_threshold_matches_reference_and_chunked(rng, monkeypatch, mode, n):
    """Key padding, an initial state and the final state (with a loss on it):
    values and gradients of q, k, v and the state, both paths, at N = 7, 8, 9
    for a threshold of 8 (the short path runs at 7 and 8 only)."""
    q, k, v = _inputs(rng, n)
    initial_kv = tf.constant(rng.random((2, H, D, M)), tf.float32)
    initial_k_sum = tf.constant(rng.random((2, H, D)), tf.float32)
    mask = _padding(rng, 2, n)
    spy = _Spy(monkeypatch)

    def ours(threshold):
        def fn(q, k, v, initial_kv, initial_k_sum):
            return kla.causal_linear_attention(
                q,
                k,
                v,
                mask,
                initial_state=(initial_kv, initial_k_sum),
                chunk_size=4,
                return_state=True,
                short_sequence_threshold=threshold,
            )

        return in_mode(lambda *a: _values_and_grads(fn, *a), mode)

    args = (q, k, v, initial_kv, initial_k_sum)
    auto = ours(THRESHOLD)(*args)
    assert spy.calls == (1 if n <= THRESHOLD else 0)
    chunked = ours(NEVER)(*args)
    assert spy.calls == (1 if n <= THRESHOLD else 0)

    def ref(q, k, v, initial_kv, initial_k_sum):
        return causal_attention_with_state(q, k, v, initial_kv, initial_k_sum, key_mask=mask)

    expected = _values_and_grads(ref, *(tf.cast(x, tf.float64) for x in args))
    _close(f"causal with state N={n} vs reference", auto, expected, dict(rtol=1e-4, atol=5e-5))
    _close(f"causal with state N={n} vs chunked", auto, chunked, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True])
def test_ops_short_path_matches_reference_and_long_path(rng, mode, causal):
    """Without a state: outputs and gradients, short path vs chunked / global
    path vs the reference, with key padding; non-causal with T ≠ S."""
    t, s = (6, 6) if causal else (5, 7)
    q, k, v = _inputs(rng, t, s)
    mask = _padding(rng, 2, s)

    def ours(threshold):
        def fn(q, k, v):
            if causal:
                return kla.causal_linear_attention(
                    q, k, v, mask, chunk_size=4, short_sequence_threshold=threshold
                )
            return kla.linear_attention(q, k, v, mask, short_sequence_threshold=threshold)

        return in_mode(lambda *a: _values_and_grads(fn, *a), mode)

    def ref(q, k, v):
        return kernel_attention(q, k, v, key_mask=mask, causal=causal)

    short = ours(ALWAYS)(q, k, v)
    _close(
        "ops vs reference",
        short,
        _values_and_grads(ref, *(tf.cast(x, "float64") for x in (q, k, v))),
    )
    _close("ops vs long path", short, ours(NEVER)(q, k, v), dict(rtol=1e-5, atol=1e-5))


def _identity_plus_one(x):
    return keras.ops.abs(x) + 0.5


class _MixingMap(kla.feature_maps.FeatureMap):
    """A φ that is not `last_axis_only`: it mixes features across heads
    (axis -2), so it must see the (B, N, H, D) layout."""

    def call(self, x):
        return keras.ops.softplus(x + 0.1 * keras.ops.mean(x, axis=-2, keepdims=True))


def _feature_map(name):
    return {
        "elu": "elu",
        "relu": "relu",
        "favor": lambda: kla.FavorFeatureMap(num_features=6, seed=2),
        "callable": lambda: _identity_plus_one,
        "mixing": _MixingMap,
    }[name]


def _layer(fmap, causal_layer=False, **kwargs):
    fmap = _feature_map(fmap)
    fmap = fmap if isinstance(fmap, str) else fmap()
    kwargs.setdefault("kernel_initializer", keras.initializers.RandomNormal(0.0, 0.5, seed=1))
    # Positive biases: relu rows far from a zero normaliser, whose gradient
    # (∝ 1/normaliser²) no float32 path reproduces (eps=0 rows: see below).
    kwargs.setdefault("bias_initializer", keras.initializers.Constant(0.5))
    cls = kla.CausalLinearAttention if causal_layer else kla.LinearMultiHeadAttention
    return cls(num_heads=H, key_dim=KEY_DIM, feature_map=fmap, **kwargs)


def _layer_values_and_grads(layer, causal, mask, mode):
    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, x, value_mask=mask, use_causal_mask=causal)
            loss = tf.reduce_sum(out * _cotangent(out))
        return [out, *tape.gradient(loss, [x, *layer.trainable_weights])]

    return in_mode(fn, mode)


# One mode per map (each mode is covered above on the ops): XLA compiles slowly.
@pytest.mark.parametrize(
    "fmap,mode",
    [("elu", "xla"), ("relu", "eager"), ("favor", "function"), ("callable", "eager")]
    + [("mixing", "function")],
)
@pytest.mark.parametrize("causal", [False, True])
def test_layer_short_path_equals_long_path_for_every_feature_map(rng, mode, fmap, causal):
    """The layer at N = 7 with key padding: outputs and the gradients of the
    input and every weight agree between the two paths; against the
    reference where it has the map (elu, relu)."""
    x = tf.constant(rng.normal(size=(2, 7, DIM)), tf.float32)
    mask = _padding(rng, 2, 7)
    layer = _layer(fmap)
    layer(x, x)
    layer._short_sequence_threshold = ALWAYS
    short = _layer_values_and_grads(layer, causal, mask, mode)(x)
    layer._short_sequence_threshold = NEVER
    long = _layer_values_and_grads(layer, causal, mask, mode)(x)
    _close(f"layer {fmap} causal={causal} vs long path", short, long, dict(rtol=1e-4, atol=1e-5))
    if fmap in ("elu", "relu"):
        phi = elu_plus_one if fmap == "elu" else relu
        ref = layer_reference(layer_weights(layer), x, x, phi=phi, key_mask=mask, causal=causal)
        _close(f"layer {fmap} vs reference", short[:1], [ref], dict(rtol=2e-4, atol=2e-5))


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_causal_layer_prefill_then_steps_equals_parallel(rng, mode):
    """CausalLinearAttention: a short prefill and one-token steps (both on the
    short path, with states in and out) equal one parallel call on the
    chunked path."""
    layer = _layer("favor", causal_layer=True, chunk_size=4)
    x = tf.constant(rng.normal(size=(2, 12, DIM)), tf.float32)
    layer(x)
    layer._short_sequence_threshold = NEVER
    full = layer(x)
    layer._short_sequence_threshold = ALWAYS
    stepped, _, state = prefill_then_steps(layer, x, 5, mode)
    assert_close("short path prefill+step vs chunked", stepped, full, **TOL)
    layer._short_sequence_threshold = NEVER
    _, expected = layer(x, return_state=True)
    _close("short path final state", state, expected, dict(rtol=1e-5, atol=1e-4))


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_dynamic_length_picks_the_path_at_run_time(rng, monkeypatch, mode):
    """One function over (None, None) lengths serves lengths on both sides of
    the threshold; values and gradients match the reference."""
    spy = _Spy(monkeypatch)
    spec = [tf.TensorSpec((None, None, H, F)) for F in (D, D, M)]

    def grads(causal):
        def fn(q, k, v):
            if causal:
                out = kla.causal_linear_attention(
                    q, k, v, chunk_size=4, short_sequence_threshold=THRESHOLD
                )
            else:
                out = kla.linear_attention(q, k, v, short_sequence_threshold=THRESHOLD)
            return out

        run = lambda q, k, v: _values_and_grads(fn, q, k, v)
        return tf.function(run, jit_compile=mode == "xla", input_signature=spec)

    for causal in (False, True):
        fn = grads(causal)
        for n in (THRESHOLD - 3, THRESHOLD + 5):
            q, k, v = _inputs(rng, n, batch=1 + n % 3)
            ref = lambda q, k, v: kernel_attention(q, k, v, causal=causal)  # noqa: B023
            expected = _values_and_grads(ref, *(tf.cast(x, "float64") for x in (q, k, v)))
            _close(f"dynamic length {n} causal={causal}", fn(q, k, v), expected)
    # Graph mode: traced once per kind, both branches in the graph (a cond).
    # XLA: the long path (XLA cannot compile a cond's gradient over these).
    assert spy.calls == (2 if mode == "function" else 0)


def test_float16_inputs_accumulate_in_float32(rng):
    """float16 φ(q), φ(k) whose row sums overflow float16 (> 65504): the
    short path sums in float32 like the others and returns float16."""
    q, k, v = _inputs(rng, 8, dtype="float64", scale=1.0)
    q, k = q * 40.0, k * 40.0
    assert float(tf.reduce_max(tf.einsum("bthd,bshd->bht", q, k))) > 65504
    ref = kernel_attention(q, k, v, causal=True)
    half = [tf.cast(x, "float16") for x in (q, k, v)]
    for causal in (False, True):
        op = kla.causal_linear_attention if causal else kla.linear_attention
        short = op(*half, short_sequence_threshold=ALWAYS)
        long = op(*half, short_sequence_threshold=NEVER)
        assert short.dtype == "float16"
        ref = kernel_attention(q, k, v, causal=causal)
        assert_close("short path float16 vs reference", short, ref, rtol=1e-2, atol=1e-2)
        assert_close("short path float16 vs long path", short, long, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_float16_layer_matches_long_path(rng, causal):
    keras.config.set_dtype_policy("mixed_float16")
    layer = _layer("elu")
    x = tf.constant(rng.normal(size=(2, 9, DIM)), tf.float32)
    mask = _padding(rng, 2, 9)
    layer(x, x)
    layer._short_sequence_threshold = ALWAYS
    short = _layer_values_and_grads(layer, causal, mask, "function")(x)
    layer._short_sequence_threshold = NEVER
    long = _layer_values_and_grads(layer, causal, mask, "function")(x)
    assert short[0].dtype == "float16"
    _close(f"mixed_float16 causal={causal}", short, long, dict(rtol=1e-2, atol=2e-3))


def test_eps_zero_rows_and_nan_in_padding(rng):
    """eps=0 with a query orthogonal to every key (relu, all-negative): 0, not
    NaN, as on the long path; NaN in padded keys never leaks."""
    q, k, v = (x.numpy() for x in _inputs(rng, 6))
    q[:, 2] = 0.0  # φ(q) = 0 for query 2: numerator and normaliser 0
    mask = np.ones((2, 6), bool)
    mask[:, 4] = False
    k[:, 4], v[:, 4] = np.nan, np.inf
    args = [tf.constant(x) for x in (q, k, v)]
    for causal in (False, True):
        op = kla.causal_linear_attention if causal else kla.linear_attention

        def fn(threshold, op=op):
            return lambda q, k, v: op(q, k, v, mask, eps=0.0, short_sequence_threshold=threshold)

        short = _values_and_grads(fn(ALWAYS), *args)
        long = _values_and_grads(fn(NEVER), *args)
        assert np.all(np.asarray(short[0])[:, 2] == 0)
        _close(f"eps=0 causal={causal}", short, long, dict(rtol=1e-5, atol=1e-6))


def test_backward_keeps_no_tensor_larger_than_the_score_matrix():
    """The short path's forward+backward graph: no tensor beyond one
    (B, H, T, S) matrix (no broadcast (T, S, D) product)."""
    b, n = 2, 64
    spec = tf.TensorSpec((b, n, H, 16), tf.float32)

    @tf.function
    def fwd_bwd(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = kla.causal_linear_attention(q, k, v, short_sequence_threshold=n)
            loss = tf.reduce_sum(out)
        return tape.gradient(loss, [q, k, v])

    graph = fwd_bwd.get_concrete_function(spec, spec, spec).graph
    sizes = [t.shape.num_elements() or 0 for op in graph.get_operations() for t in op.outputs]
    assert max(sizes) <= b * H * n * n


@pytest.mark.parametrize("bad", [-1, 2.5, True, "64"])
def test_bad_threshold_is_refused(bad):
    q = tf.ones((1, 4, H, D))
    match = r"`short_sequence_threshold` must be"
    with pytest.raises(ValueError, match=match):
        kla.LinearMultiHeadAttention(H, KEY_DIM, short_sequence_threshold=bad)
    with pytest.raises(ValueError, match=match):
        kla.CausalLinearAttention(H, KEY_DIM, short_sequence_threshold=bad)
    with pytest.raises(ValueError, match=match):
        kla.causal_linear_attention(q, q, q, short_sequence_threshold=bad)
    with pytest.raises(ValueError, match=match):
        kla.linear_attention(q, q, q, short_sequence_threshold=bad)


@pytest.mark.parametrize("cls", [kla.LinearMultiHeadAttention, kla.CausalLinearAttention])
@pytest.mark.parametrize("threshold", [None, 0, 100])
def test_threshold_round_trips_through_get_config(cls, threshold):
    layer = cls(H, KEY_DIM, short_sequence_threshold=threshold)
    config = layer.get_config()
    assert config["short_sequence_threshold"] == threshold
    again = cls.from_config(config)
    assert again.get_config()["short_sequence_threshold"] == threshold
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert restored._short_sequence_threshold == threshold


@pytest.mark.smoke
def test_training_shapes_benchmark_smoke(tmp_path):
    """benchmarks/training_shapes.py --quick end to end (its numbers mean nothing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import training_shapes

    out = tmp_path / "t.json"
    report = training_shapes.main(["--quick", "--out", str(out)])
    assert report["machine"]["cores"] > 0
    rows = report["results"]
    assert {(r["n"], r["causal"]) for r in rows} == {(8, True), (16, True), (8, False), (16, False)}
    for row in rows:
        assert set(row["ms"]) == set(training_shapes.IMPLS)
        assert all(v > 0 for v in (*row["ms"].values(), *row["mha_over"].values()))
    assert out.read_text().startswith("{")
    assert (tmp_path / "training_shapes.png").stat().st_size > 0


@pytest.mark.smoke
def test_training_throughput_benchmark_smoke(tmp_path):
    """benchmarks/training_throughput.py --quick end to end (its numbers mean
    nothing), with a skip forced by `--max-seconds`."""
    pytest.importorskip("keras_hub")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import training_throughput

    out = tmp_path / "t.json"
    report = training_throughput.main(
        ["--quick", "--lengths", "8", "512", "--max-seconds", "5", "--out", str(out)]
    )
    first, second = report["results"]
    assert set(first["tokens_per_s"]) == set(training_throughput.IMPLS)
    assert all(v > 0 for v in (*first["tokens_per_s"].values(), *first["over_mha"].values()))
    # 64 times as long: softmax's estimate (N², 4096 steps' time) passes 5 s,
    # linear's (64 steps' time) does not.
    assert second["skipped"] == ["keras_mha", "hub_softmax"]
    assert set(second["tokens_per_s"]) == {"ours", "hub_linear", "no_mixing"}
    # The skipped models are tried once each in a capped process, beside ours.
    assert set(second["probes"]) == {"keras_mha", "hub_softmax", "ours"}
    assert all(p["status"] == "ok" and p["peak_rss_mib"] > 0 for p in second["probes"].values())
    assert json.loads(out.read_text())["results"][0]["n"] == 8


@pytest.mark.smoke
def test_layer_and_model_benchmarks_run_under_jax(tmp_path):
    """Both training benchmarks under KERAS_BACKEND=jax (their JAX rows)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    for script, extra in (
        ("training_shapes.py", ["--lengths", "8"]),
        ("training_throughput.py", ["--lengths", "16", "--impls", "keras_mha", "ours"]),
    ):
        out = tmp_path / script.replace(".py", ".json")
        cmd = [sys.executable, str(root / "benchmarks" / script), "--quick", "--out", str(out)]
        subprocess.run(cmd + extra, env=env, check=True, capture_output=True, timeout=600)
        report = json.loads(out.read_text())
        assert report["machine"]["backend"] == "jax"
        # JAX runs compiled: the rows say so (shapes per row, throughput per run).
        assert all(row.get("jit", report.get("jit")) is True for row in report["results"])
