"""Gated linear attention and the (gated) delta rule against literal float64
token-by-token recurrences (tests/reference.py): outputs, final states,
gradients, prefill-then-step, chunk-size independence, long float16 runs."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode
from reference import (
    delta_recurrence,
    delta_recurrence_tf,
    gated_recurrence,
    gated_recurrence_tf,
)

import keras_linear_attention.ops as klo

H, D, M = 2, 4, 3


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _inputs(rng, op, n, gate="token", state=False, batch=2, dtype="float32", d=D, m=M, shared=0):
    """Model-like inputs as a dict: delta-rule keys L2-normalised, beta a
    sigmoid, gates in (0, 1). gate: "token" (B,T,H), "head" (H,) RetNet-style,
    "strong" (≈ -5 per token: -320 over a 64-chunk), or None (delta only).
    `shared` adds a common direction to all keys (real keys are correlated)."""
    shape = (batch, n, H)
    a = {
        "q": rng.normal(size=(*shape, d)),
        "k": rng.normal(size=(*shape, d)) + shared * rng.normal(size=d),
        "v": rng.normal(size=(*shape, m)),
    }
    if op == "delta":
        a["k"] /= np.linalg.norm(a["k"], axis=-1, keepdims=True)
        a["beta"] = _sigmoid(rng.normal(size=shape))
    if gate == "token":
        a["log_gate"] = np.log(_sigmoid(rng.normal(size=shape) + 3))
    elif gate == "head":
        a["log_gate"] = np.log(_sigmoid(rng.normal(size=H) + 3))
    elif gate == "strong":
        a["log_gate"] = np.minimum(-5 + 0.5 * rng.normal(size=shape), 0.0)
    if state:
        a["s0"] = rng.normal(size=(batch, H, d, m))
    return {name: tf.constant(x, dtype) for name, x in a.items()}


def _op(op, a, **kwargs):
    if op == "gated":
        return klo.gated_linear_attention(
            a["q"], a["k"], a["v"], a["log_gate"], initial_state=a.get("s0"), **kwargs
        )
    return klo.delta_rule_attention(
        a["q"],
        a["k"],
        a["v"],
        a["beta"],
        log_gate=a.get("log_gate"),
        initial_state=a.get("s0"),
        **kwargs,
    )


def _step(op, a, state):
    if op == "gated":
        return klo.gated_linear_attention_step(a["q"], a["k"], a["v"], a["log_gate"], state)
    return klo.delta_rule_step(a["q"], a["k"], a["v"], a["beta"], a.get("log_gate"), state)


def _reference(op, a, tf_ops=False):
    """(o, S_final) from the literal recurrence (NumPy, or TF for gradients)."""
    if op == "gated":
        fn = gated_recurrence_tf if tf_ops else gated_recurrence
        return fn(a["q"], a["k"], a["v"], a["log_gate"], a.get("s0"))
    fn = delta_recurrence_tf if tf_ops else delta_recurrence
    return fn(a["q"], a["k"], a["v"], a["beta"], a.get("log_gate"), a.get("s0"))


def _run(op, a, mode, chunk):
    return in_mode(lambda a: _op(op, a, chunk_size=chunk, return_state=True), mode)(a)


def _check(name, got, expected, dtype, labels=("out", "state"), tol=None):
    """Relative to each array's scale: rtol and atol = tol · max|expected|."""
    tol = tol or (1e-4 if dtype == "float32" else 1e-10)
    for label, x, y in zip(labels, got, expected, strict=True):
        y = np.asarray(y)
        assert_close(f"{name} {label} ({dtype})", x, y, rtol=tol, atol=tol * np.abs(y).max())


def _check_dtypes(got, dtype):
    out, state = got
    assert out.dtype == dtype  # v's dtype
    assert state.dtype == ("float64" if dtype == "float64" else "float32")


OPS = ["gated", "delta"]
# Lengths 1, 7, 64, 65 against chunks 1, 16, 64: one chunk, exact multiples, a padded tail.
LENGTHS = [(1, 64), (7, 1), (7, 16), (64, 16), (64, 64), (65, 16), (65, 64)]
# (op, gate, initial state): RetNet (H,) gates, strong decay, the ungated delta rule.
VARIANTS = [
    ("gated", "token", True),
    ("gated", "head", False),
    ("gated", "strong", True),
    ("delta", "token", True),
    ("delta", "head", False),
    ("delta", "strong", True),
    ("delta", None, False),
    ("delta", None, True),
]


def _variant_id(p):
    return "-".join(str(x) for x in p) if isinstance(p, tuple) else None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,chunk", LENGTHS)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(rng, op, n, chunk, mode):
    a = _inputs(rng, op, n)
    got = _run(op, a, mode, chunk)
    _check_dtypes(got, "float32")
    _check(f"{op} vs recurrence", got, _reference(op, a), "float32")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op,gate,state", VARIANTS, ids=_variant_id)
def test_variants_match_reference(rng, op, gate, state, mode):
    # 130 tokens over 64-chunks: within-chunk decays reach exp(-320) for
    # "strong", which overflows float32 if computed as exp(b_i)·exp(-b_j).
    a = _inputs(rng, op, 130, gate, state)
    _check(f"{op} {gate} vs recurrence", _run(op, a, mode, 64), _reference(op, a), "float32")


@pytest.mark.parametrize("gate", [None, "token"])
@pytest.mark.parametrize("d", [4, 32])
def test_delta_correlated_keys_default_chunk(rng, d, gate):
    """Keys sharing a direction (norm-1 but far from orthogonal) make the
    chunk's I + tril(βKKᵀ) hard to invert stably at the default chunk 64."""
    a = _inputs(rng, "delta", 130, gate, d=d, shared=2.0)
    _check(
        f"delta correlated keys d={d}",
        _run("delta", a, "eager", 64),
        _reference("delta", a),
        "float32",
    )


@pytest.mark.parametrize("op,gate,state", VARIANTS, ids=_variant_id)
def test_float64_matches_reference(rng, op, gate, state):
    a = _inputs(rng, op, 65, gate, state, dtype="float64")
    got = _run(op, a, "eager", 16)
    _check_dtypes(got, "float64")
    _check(f"{op} {gate} vs recurrence", got, _reference(op, a), "float64")


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_long_sequence_matches_reference(rng, op):
    a = _inputs(rng, op, 1000, state=True, batch=1)
    _check(f"{op} N=1000 vs recurrence", _run(op, a, "function", 64), _reference(op, a), "float32")


def _values_and_grads(fn, a, w):
    """Outputs, final state, and gradients of a loss on both (as truncated
    BPTT has) wrt every input, in sorted-name order."""
    names = sorted(a)
    with tf.GradientTape() as tape:
        tape.watch([a[name] for name in names])
        out, state = fn(a)
        loss = tf.reduce_sum(out * tf.cast(w[0], out.dtype))
        loss += tf.reduce_sum(state * tf.cast(w[1], state.dtype))
    return [out, state, *tape.gradient(loss, [a[name] for name in names])]


@pytest.mark.parametrize(
    "mode,dtype",
    [("eager", "float32"), ("function", "float32"), ("xla", "float32")] + [("eager", "float64")],
)
@pytest.mark.parametrize(
    "op,gate", [("gated", "token"), ("gated", "head"), ("delta", "token"), ("delta", None)]
)
def test_gradients_match_reference(rng, op, gate, mode, dtype):
    a = _inputs(rng, op, 37, gate, state=True, dtype=dtype)
    w = (rng.normal(size=(2, 37, H, M)), rng.normal(size=(2, H, D, M)))
    got = in_mode(
        lambda a: _values_and_grads(lambda a: _op(op, a, chunk_size=8, return_state=True), a, w),
        mode,
    )(a)
    a64 = {name: tf.cast(x, tf.float64) for name, x in a.items()}
    expected = _values_and_grads(lambda a: _reference(op, a, tf_ops=True), a64, w)
    labels = ["out", "state", *(f"d {name}" for name in sorted(a))]
    _check(f"{op} {gate} grads", got, expected, dtype, labels, 1e-4 if dtype == "float32" else 1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_segmented_gradients_match_reference(rng, op, mode, monkeypatch):
    """Sequences longer than SEGMENT_LENGTH run as rematerialised segments
    (here 37 tokens: segments of 16, 16 and 5): same values and gradients,
    the initial and returned states included."""
    monkeypatch.setattr(klo.recurrences, "SEGMENT_LENGTH", 16)
    test_gradients_match_reference(rng, op, "token", mode, "float32")


@pytest.mark.parametrize("mode", MODES)
def test_segmented_gradients_of_outputs_alone(rng, mode, monkeypatch):
    """A loss on the outputs only (no gradient reaches the final state) and
    two gradients of one forward pass: the delta rule's hand-written segment
    backward on TensorFlow must still match the reference."""
    monkeypatch.setattr(klo.recurrences, "SEGMENT_LENGTH", 16)
    a = _inputs(rng, "delta", 37, "token", state=True)
    w = rng.normal(size=(2, 37, H, M))
    names = sorted(a)

    def grads(a):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([a[name] for name in names])
            loss = tf.reduce_sum(_op("delta", a, chunk_size=8) * tf.cast(w, tf.float32))
            twice = 2 * loss
        first = tape.gradient(loss, [a[name] for name in names])
        return first + tape.gradient(twice, [a[name] for name in names])

    got = in_mode(grads, mode)(a)
    a64 = {name: tf.cast(x, tf.float64) for name, x in a.items()}
    with tf.GradientTape() as tape:
        tape.watch([a64[name] for name in names])
        loss = tf.reduce_sum(_reference("delta", a64, tf_ops=True)[0] * w)
    expected = tape.gradient(loss, [a64[name] for name in names])
    expected = expected + [2 * g for g in expected]
    labels = [f"d {name}" for name in names] * 2
    _check("delta grads of outputs alone", got, expected, "float32", labels, 1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prompt", [1, 13, 32])
@pytest.mark.parametrize("op,gate", [("gated", "token"), ("delta", "token"), ("delta", None)])
def test_prefill_then_steps_equals_parallel(rng, op, gate, prompt, mode):
    n = 40
    a = _inputs(rng, op, n, gate, state=True)
    seq = {name: x for name, x in a.items() if name != "s0"}
    prompt_a = {name: x[:, :prompt] for name, x in seq.items()} | {"s0": a["s0"]}
    out, state = _run(op, prompt_a, mode, 16)
    step = in_mode(lambda a_t, s: _step(op, a_t, s), mode)
    outs = [out]
    for t in range(prompt, n):
        o, state = step({name: x[:, t] for name, x in seq.items()}, state)
        outs.append(o[:, None])
    whole = _run(op, a, mode, 16)
    _check(f"{op} prefill+step vs parallel", (tf.concat(outs, 1), state), whole, "float32")


@pytest.mark.parametrize("op", OPS)
def test_chunk_size_does_not_change_result(rng, op):
    a = _inputs(rng, op, 100, state=True)
    first = _run(op, a, "eager", 1)
    for chunk in [3, 16, 64, 100, 512]:
        _check(
            f"{op} chunk {chunk} vs chunk 1",
            _run(op, a, "eager", chunk),
            first,
            "float32",
            tol=1e-5,
        )


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_long_float16_stays_finite(rng, op):
    """65536 float16 tokens: the float32 state and decays must neither overflow
    nor lose the output to NaN. Unit-norm q, k as models normalise them."""
    a = _inputs(rng, op, 65536, batch=1, dtype="float32", d=16, m=16)
    for name in ("q", "k"):
        a[name] = tf.math.l2_normalize(a[name], -1)
    a = {name: tf.cast(x, tf.float16) for name, x in a.items()}
    out, state = _run(op, a, "function", 64)
    assert out.dtype == tf.float16 and state.dtype == tf.float32
    assert np.all(np.isfinite(out.numpy())) and np.all(np.isfinite(state.numpy()))


# Bad-input cases: small valid tensors with one argument spoiled.
_Q, _V = tf.zeros((2, 5, H, D)), tf.zeros((2, 5, H, M))
_G, _S = tf.zeros((2, 5, H)), tf.zeros((2, H, D, M))


def _gla(q=_Q, k=_Q, v=_V, g=_G, **kwargs):
    return lambda: klo.gated_linear_attention(q, k, v, g, **kwargs)


def _delta(q=_Q, k=_Q, v=_V, beta=_G, **kwargs):
    return lambda: klo.delta_rule_attention(q, k, v, beta, **kwargs)


BAD = [
    ("int q", _gla(q=tf.zeros((2, 5, H, D), tf.int32)), TypeError, r"\bq\b"),
    ("int log_gate", _gla(g=tf.zeros((2, 5, H), tf.int32)), TypeError, "log_gate"),
    ("int beta", _delta(beta=tf.zeros((2, 5, H), tf.int32)), TypeError, "beta"),
    ("int state", _delta(initial_state=tf.zeros((2, H, D, M), tf.int32)), TypeError, "initial"),
    ("q rank 3", _gla(q=tf.zeros((2, 5, H * D))), ValueError, r"\bq\b"),
    ("log_gate rank 2", _gla(g=tf.zeros((2, 5))), ValueError, "log_gate"),
    ("log_gate length", _gla(g=tf.zeros((2, 4, H))), ValueError, "log_gate"),
    ("log_gate heads (H,)", _gla(g=tf.zeros((H + 1,))), ValueError, "log_gate"),
    ("delta log_gate", _delta(log_gate=tf.zeros((2, 5, 1 + H))), ValueError, "log_gate"),
    ("beta shape", _delta(beta=tf.zeros((2, 5, H, 1))), ValueError, "beta"),
    ("v length", _gla(v=tf.zeros((2, 6, H, M))), ValueError, r"\b[kv]\b"),
    ("k dim", _delta(k=tf.zeros((2, 5, H, D + 1))), ValueError, r"\b[qk]\b"),
    ("state shape", _gla(initial_state=tf.zeros((2, H, D, D))), ValueError, "initial_state"),
    ("chunk 0", _gla(chunk_size=0), ValueError, "chunk_size"),
    ("chunk 2.5", _delta(chunk_size=2.5), ValueError, "chunk_size"),
    (
        "step state shape",
        lambda: klo.gated_linear_attention_step(_Q[:, 0], _Q[:, 0], _V[:, 0], _G[:, 0], _S[:1]),
        ValueError,
        "state",
    ),
    (
        "step beta shape",
        lambda: klo.delta_rule_step(_Q[:, 0], _Q[:, 0], _V[:, 0], _G[:, 0, 0], None, _S),
        ValueError,
        "beta",
    ),
]


@pytest.mark.parametrize("desc,fn,exc,pattern", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(desc, fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 300, 5000])
def test_decayed_exclusive_prefix_matches_a_loop(n):
    """The blocked, scan-free prefix sum of the gated chunk states (two block
    levels and a matrix for n = 5000), strong decays included."""
    from keras_linear_attention.ops.recurrences import decayed_exclusive_prefix

    rng = np.random.default_rng(n)
    x = rng.normal(size=(2, n, 3))
    a = np.log(rng.uniform(0.05, 1.0, (2, n)))
    a[:, ::7] = -400.0  # exp(a) underflows: differences must stay finite
    s0 = rng.normal(size=(2, 3))
    prefix, final = decayed_exclusive_prefix(x, a, s0)
    state, expected = s0.copy(), np.zeros_like(x)
    for i in range(n):
        expected[:, i] = state
        state = np.exp(a[:, i])[:, None] * state + x[:, i]
    np.testing.assert_allclose(prefix, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final, state, rtol=1e-10, atol=1e-12)
