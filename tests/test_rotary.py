"""Rotary position embeddings (RoFormer eq. 19): `ops.rotary` and the layers'
`rotary_max_wavelength`, against the explicit float64 reference
(tests/reference.py, complex-number rotations): values, states, gradients,
prefill-then-step, the layer contract."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode
from layer_test_case import run_layer_test
from reference import (
    elu_plus_one,
    layer_weights,
    rotary_attention,
    rotary_layer_reference,
    rotary_rotate,
)

import keras_linear_attention as kla
from keras_linear_attention.hub import LinearCachedMultiHeadAttention
from keras_linear_attention.ops import (
    rotary_causal_linear_attention,
    rotary_linear_attention,
    rotary_linear_attention_step,
    rotate,
    zero_state,
)

H, F, M = 2, 6, 3
DIM, KEY_DIM = 8, 4
# Short: the pairs turn by 1, 0.1 and 0.01 rad per position, all visible at small N.
WAVE = 100.0


def _features(rng, b, n, dtype="float32"):
    return tf.cast(elu_plus_one(tf.constant(rng.normal(size=(b, n, H, F)))), dtype)


def _inputs(rng, t, s=None, dtype="float32", state=False):
    """φq, φk, v (and an initial state `(kv, k_sum)` of positive k_sum)."""
    s = t if s is None else s
    a = {"q": _features(rng, 2, t, dtype), "k": _features(rng, 2, s, dtype)}
    a["v"] = tf.constant(rng.normal(size=(2, s, H, M)), dtype)
    if state:
        a["kv0"] = tf.constant(rng.normal(size=(2, H, F, M)), dtype)
        a["k_sum0"] = tf.constant(rng.uniform(1, 3, size=(2, H, F)), dtype)
    return a


def _padding(rng, n):
    mask = rng.random((2, n)) > 0.3
    mask[:, 0] = True
    return tf.constant(mask)


def _check(name, got, expected, dtype, tol=None):
    """Each array relative to its own scale (rotated numerators are signed;
    a gradient that vanishes, as dφq with one key, to a floor of 0.01)."""
    tol = tol or (2e-4 if dtype == "float32" else 1e-9)
    for i, (x, y) in enumerate(zip(got, expected, strict=True)):
        y = np.asarray(y)
        atol = tol * max(np.abs(y).max(), 1e-2)
        assert_close(f"{name} [{i}] ({dtype})", x, y, rtol=tol, atol=atol)


def _values_and_grads(fn, a, w):
    """fn(a) -> (out, *state); a fixed-cotangent loss on all of them, and its
    gradients wrt every input (sorted names)."""
    names = sorted(a)
    with tf.GradientTape() as tape:
        tape.watch([a[n] for n in names])
        outs = fn(a)
        loss = sum(tf.reduce_sum(o * tf.cast(c, o.dtype)) for o, c in zip(outs, w, strict=False))
    return [*outs, *tape.gradient(loss, [a[n] for n in names])]


def _cotangents(rng, outs):
    return [rng.normal(size=o.shape) for o in outs]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rotate_matches_reference_and_keeps_norms(rng, dtype, mode):
    x = tf.constant(rng.normal(size=(2, 5, H, F)), dtype)
    start = tf.constant(7)  # a traced tensor under tf.function
    got = in_mode(lambda x, s: rotate(x, s, WAVE), mode)(x, start)
    assert got.dtype == dtype
    _check("rotate", [got], [rotary_rotate(x, 7, WAVE)], dtype, 1e-6 if dtype == "float32" else 0)
    norms = lambda y: np.linalg.norm(np.asarray(y, np.float64), axis=-1)
    np.testing.assert_allclose(norms(got), norms(x), rtol=1e-5 if dtype == "float32" else 1e-12)


def test_rotated_scores_depend_on_relative_position_only(rng):
    q, k = (tf.constant(rng.normal(size=(1, 1, 1, F))) for _ in range(2))
    dot = lambda i, j: float(tf.reduce_sum(rotate(q, i, WAVE) * rotate(k, j, WAVE)))
    for i, j in [(0, 0), (3, 1), (2, 9)]:
        np.testing.assert_allclose(dot(i + 5, j + 5), dot(i, j), rtol=1e-12)
    assert abs(dot(3, 1) - dot(1, 1)) > 1e-3  # and it does depend on it


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t,s,masked", [(1, 1, False), (5, 9, True), (70, 66, True)])
def test_noncausal_matches_reference(rng, t, s, masked, mode):
    a = _inputs(rng, t, s)
    mask = _padding(rng, s) if masked else None
    ours = lambda a: [rotary_linear_attention(a["q"], a["k"], a["v"], mask, max_wavelength=WAVE)]
    ref = lambda a: [rotary_attention(a["q"], a["k"], a["v"], mask, max_wavelength=WAVE)[0]]
    w = _cotangents(rng, ref(a))
    got = in_mode(lambda a: _values_and_grads(ours, a, w), mode)(a)
    a64 = {n: tf.cast(x, tf.float64) for n, x in a.items()}
    _check("rotary noncausal", got, _values_and_grads(ref, a64, w), "float32")


def _causal(a, mask=None, start=0, chunk=64):
    state = (a["kv0"], a["k_sum0"]) if "kv0" in a else None
    out, (kv, k_sum) = rotary_causal_linear_attention(
        a["q"], a["k"], a["v"], start, mask, state, True, chunk_size=chunk, max_wavelength=WAVE
    )
    return [out, kv, k_sum]


def _causal_reference(a, mask=None, start=0):
    state = (a["kv0"], a["k_sum0"]) if "kv0" in a else None
    out, state = rotary_attention(a["q"], a["k"], a["v"], mask, True, state, start, WAVE)
    return [out, *state]


# (n, chunk, key mask, initial state): one token, chunks of 1, 4 and 64,
# lengths that are and are not multiples of the chunk.
CAUSAL = [(1, 64, False, True), (7, 1, True, False), (9, 4, True, True), (70, 64, True, True)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,chunk,masked,state", CAUSAL)
def test_causal_matches_reference(rng, n, chunk, masked, state, mode):
    a = _inputs(rng, n, state=state)
    mask = _padding(rng, n) if masked else None
    start = 5 if state else 0
    w = _cotangents(rng, _causal_reference(a))
    got = in_mode(lambda a, s: _values_and_grads(lambda a: _causal(a, mask, s, chunk), a, w), mode)(
        a, tf.constant(start)
    )
    a64 = {n: tf.cast(x, tf.float64) for n, x in a.items()}
    expected = _values_and_grads(lambda a: _causal_reference(a, mask, start), a64, w)
    _check("rotary causal", got, expected, "float32")


@pytest.mark.parametrize("causal", [False, True])
def test_float64_is_exact(rng, causal):
    a = _inputs(rng, 37, dtype="float64", state=causal)
    mask = _padding(rng, 37)
    if causal:
        ours, ref = (lambda a: _causal(a, mask, 3, 8)), (lambda a: _causal_reference(a, mask, 3))
    else:
        ours = lambda a: [
            rotary_linear_attention(a["q"], a["k"], a["v"], mask, max_wavelength=WAVE)
        ]
        ref = lambda a: [rotary_attention(a["q"], a["k"], a["v"], mask, max_wavelength=WAVE)[0]]
    w = _cotangents(rng, ref(a))
    got = _values_and_grads(ours, a, w)
    assert got[0].dtype == "float64"
    _check("rotary float64", got, _values_and_grads(ref, a, w), "float64")


@pytest.mark.parametrize("mode", MODES)
def test_continuing_and_stepping_equal_the_whole_sequence(rng, mode):
    """The state after a prefix, continued at start_index = prefix length, by
    a chunked call or token by token, gives the whole sequence's tail."""
    a, prefix = _inputs(rng, 12), 5
    whole = _causal(a)
    head = {n: x[:, :prefix] for n, x in a.items()}
    tail = {n: x[:, prefix:] for n, x in a.items()}
    _, *state = _causal(head)
    cont = in_mode(lambda t, s, i: _causal({**t, "kv0": s[0], "k_sum0": s[1]}, None, i, 4), mode)
    _check(
        "rotary continued",
        cont(tail, state, tf.constant(prefix)),
        [whole[0][:, prefix:], *whole[1:]],
        "float32",
    )
    step = in_mode(
        lambda q, k, v, s, i: rotary_linear_attention_step(q, k, v, s, i, max_wavelength=WAVE), mode
    )
    outs = []
    for i in range(prefix, 12):
        out, state = step(a["q"][:, i], a["k"][:, i], a["v"][:, i], state, tf.constant(i))
        outs.append(out)
    _check(
        "rotary steps", [tf.stack(outs, 1), *state], [whole[0][:, prefix:], *whole[1:]], "float32"
    )


def test_masked_keys_add_nothing_even_when_nan(rng):
    a = _inputs(rng, 9)
    mask = _padding(rng, 9)
    dropped = tf.logical_not(mask)[:, :, None, None]
    spoiled = {**a, "k": tf.where(dropped, np.nan, a["k"]), "v": tf.where(dropped, np.inf, a["v"])}
    _check("rotary NaN in masked keys", _causal(spoiled, mask), _causal(a, mask), "float32", 1e-6)


BAD_OPS = [
    (
        "odd F",
        lambda q: rotary_linear_attention(q[..., :5], q[..., :5], q),
        "max_wavelength.*odd feature dim 5",
    ),
    ("wavelength 0", lambda q: rotate(q, 0, 0.0), "max_wavelength"),
    (
        "wavelength nan",
        lambda q: rotary_causal_linear_attention(q, q, q, max_wavelength=np.nan),
        "max_wavelength",
    ),
    (
        "state shape",
        lambda q: rotary_causal_linear_attention(q, q, q, initial_state=zero_state(2, H, F + 1, F)),
        r"initial_state\[0\] \(kv\)",
    ),
    (
        "step state",
        lambda q: rotary_linear_attention_step(
            q[:, 0], q[:, 0], q[:, 0], zero_state(1, H, F, F), 0
        ),
        "initial_state",
    ),
]


@pytest.mark.parametrize("fn,pattern", [c[1:] for c in BAD_OPS], ids=[c[0] for c in BAD_OPS])
def test_ops_bad_arguments_are_named(fn, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(tf.ones((2, 4, H, F)))


# Layers.


def _layer(cls=kla.CausalLinearAttention, **kwargs):
    kwargs.setdefault("kernel_initializer", keras.initializers.RandomNormal(0.0, 0.5, seed=1))
    kwargs.setdefault("bias_initializer", keras.initializers.RandomNormal(0.0, 0.5, seed=2))
    return cls(num_heads=H, key_dim=KEY_DIM, rotary_max_wavelength=WAVE, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_causal_layer_matches_reference_and_steps(rng, mode):
    layer = _layer(chunk_size=4)
    x = tf.constant(rng.normal(size=(2, 11, DIM)), tf.float32)
    mask = _padding(rng, 11)
    full = layer(x, padding_mask=mask)
    ref = rotary_layer_reference(layer_weights(layer), x, x, WAVE, causal=True, key_mask=mask)
    _check("rotary causal layer", [full], [ref], "float32")
    call = in_mode(
        lambda x, m, s, i: layer(x, m, initial_state=s, return_state=True, start_index=i), mode
    )
    outs, state = [], layer.get_initial_state(2)
    for lo, hi in [(0, 4), *((t, t + 1) for t in range(4, 11))]:  # prefill, then steps
        out, state = call(x[:, lo:hi], mask[:, lo:hi], state, tf.constant(lo))
        outs.append(out)
    _check("rotary causal layer steps", [tf.concat(outs, 1)], [full], "float32")


@pytest.mark.parametrize("causal,t,s", [(False, 5, 7), (True, 7, 7), (True, 5, 7), (True, 7, 4)])
def test_linear_mha_matches_reference(rng, causal, t, s):
    layer = _layer(kla.LinearMultiHeadAttention)
    q = tf.constant(rng.normal(size=(2, t, DIM)), tf.float32)
    v = q if t == s else tf.constant(rng.normal(size=(2, s, DIM)), tf.float32)
    mask = _padding(rng, s)
    out, scores = layer(q, v, value_mask=mask, use_causal_mask=causal, return_attention_scores=True)
    w = layer_weights(layer)
    ref = rotary_layer_reference(w, q, v, WAVE, causal=causal, key_mask=mask)
    _check("rotary linear MHA", [out], [ref], "float32")
    # Scores: the reference with one-hot values is the matrix itself.
    phi = lambda x, name: elu_plus_one(
        tf.einsum("btd,dhk->bthk", tf.cast(x, tf.float64), w[f"{name}/kernel"]) + w[f"{name}/bias"]
    )
    eye = tf.broadcast_to(tf.eye(s, dtype=tf.float64)[None, :, None, :], (2, s, H, s))
    matrix, _ = rotary_attention(
        phi(q, "query"), phi(v, "key"), eye, mask, causal, max_wavelength=WAVE
    )
    _check("rotary scores", [scores], [tf.transpose(matrix, (0, 2, 1, 3))], "float32")


@pytest.mark.parametrize("cls", [kla.CausalLinearAttention, kla.LinearMultiHeadAttention])
def test_rotary_none_changes_nothing(rng, cls):
    x = tf.constant(rng.normal(size=(2, 9, DIM)), tf.float32)
    call = (
        (lambda layer: layer(x))
        if cls is kla.CausalLinearAttention
        else (lambda layer: layer(x, x, use_causal_mask=True))
    )
    plain = cls(num_heads=H, key_dim=KEY_DIM)
    none = cls(num_heads=H, key_dim=KEY_DIM, rotary_max_wavelength=None)
    call(plain), call(none)
    none.set_weights(plain.get_weights())
    np.testing.assert_array_equal(call(none), call(plain))
    assert none.get_config()["rotary_max_wavelength"] is None


@pytest.mark.parametrize(
    "cls,inputs,call_kwargs",
    [
        (kla.CausalLinearAttention, (2, 6, DIM), {}),
        (
            kla.LinearMultiHeadAttention,
            {"query": (2, 6, DIM), "value": (2, 6, DIM)},
            {"use_causal_mask": True},
        ),
    ],
    ids=["causal", "linear_mha"],
)
def test_shared_layer_checks(tmp_path, cls, inputs, call_kwargs):
    run_layer_test(
        cls,
        {"num_heads": H, "key_dim": KEY_DIM, "rotary_max_wavelength": 500.0},
        inputs,
        (2, 6, DIM),
        call_kwargs=call_kwargs,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "value,kwargs",
    [
        (0, {}),
        (-1.0, {}),
        (np.nan, {}),
        (np.inf, {}),
        ("x", {}),
        (True, {}),
        (WAVE, {"recurrence": "gated"}),
    ],
)
def test_bad_rotary_values_are_named(value, kwargs):
    with pytest.raises(ValueError, match="rotary_max_wavelength"):
        kla.CausalLinearAttention(
            num_heads=H, key_dim=KEY_DIM, rotary_max_wavelength=value, **kwargs
        )


def test_odd_feature_dim_is_named():
    layer = kla.CausalLinearAttention(num_heads=H, key_dim=3, rotary_max_wavelength=WAVE)
    with pytest.raises(ValueError, match="rotary_max_wavelength.*odd feature dim 3"):
        layer(tf.zeros((1, 4, DIM)))


def test_hub_cached_attention_steps_with_cache_update_index(rng):
    layer = _layer(LinearCachedMultiHeadAttention)
    x = tf.constant(rng.normal(size=(2, 7, DIM)), tf.float32)
    parallel = layer(x, x, use_causal_mask=True)
    outs, state = [], layer.get_initial_state(2)
    for lo, hi in [(0, 3), *((t, t + 1) for t in range(3, 7))]:
        y = x[:, lo:hi]
        out, state = layer(y, y, cache=state, cache_update_index=lo)
        outs.append(out)
    _check("rotary hub steps", [tf.concat(outs, 1)], [parallel], "float32")
