"""Every mask linear attention computes exactly, in every form Keras accepts
(issue 18, item 1), against a float64 reference built from the explicit
T×S mask matrix; arbitrary patterns are refused in every mode."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode, seeded_mha
from reference import EPS, elu_plus_one, layer_weights

DIM, HEADS, KEY_DIM = 6, 2, 4
TOL = dict(rtol=2e-4, atol=2e-5)


def _layer(**kwargs):
    return seeded_mha(num_heads=HEADS, key_dim=KEY_DIM, **kwargs)


def masked_reference(w, query, value, mask):
    """LinearMultiHeadAttention from its weights `w` with an explicit
    `(B, T, S)` mask, float64: `A = φ(Q)φ(K)ᵀ ∘ mask`, `out = A V / (A 1 +
    eps)`; a row with no True entry gets the mean of all S values (what
    Keras's fused softmax path gives a fully masked row)."""
    query, value = tf.cast(query, tf.float64), tf.cast(value, tf.float64)
    mask = tf.cast(mask, tf.float64)[:, None]  # (B, 1, T, S)

    def proj(x, name):
        return tf.einsum("btd,dhk->bthk", x, w[f"{name}/kernel"]) + w[f"{name}/bias"]

    q, k, v = (
        elu_plus_one(proj(query, "query")),
        elu_plus_one(proj(value, "key")),
        proj(value, "value"),
    )
    a = tf.einsum("bthd,bshd->bhts", q, k) * mask
    out = tf.einsum("bhts,bshm->bthm", a / (tf.reduce_sum(a, -1, keepdims=True) + EPS), v)
    empty = tf.transpose(tf.reduce_max(mask, -1), (0, 2, 1))[..., None] == 0  # (B, T, 1, 1)
    out = tf.where(empty, tf.reduce_mean(v, 1, keepdims=True), out)
    return (
        tf.einsum("bthk,hkd->btd", out, w["attention_output/kernel"]) + w["attention_output/bias"]
    )


def _tril(t, s):
    return np.tril(np.ones((t, s), bool))  # Keras's causal mask, also for T != S


def _padding(rng, b, n, first=True):
    keep = rng.random((b, n)) > 0.35
    keep[0, :] = True
    keep[-1, 0] = first  # False: a causal row that sees no key
    keep[-1, -1] = False  # a padded query (non-causal: a fully masked row)
    return keep


# (name, t, s, how the mask is given, threshold): `how` builds the layer
# call's keyword arguments and the equivalent explicit (B, T, S) mask.
def _case(how, rng, t, s):
    q, k = _padding(rng, 2, t), _padding(rng, 2, s, first=False)
    dense = q[:, :, None] & k[:, None, :]
    if how == "rank3_padding":  # query × key padding, T != S
        return dict(attention_mask=dense), dense
    if how == "rank4_causal_by_value":  # tril × padding, no use_causal_mask
        full = dense & _tril(t, s)
        return dict(attention_mask=np.repeat(full[:, None], HEADS, 1)), full
    if how == "rank2_tril":  # Keras's causal mask as a (T, S) tensor
        return dict(attention_mask=_tril(t, s).astype("float32")), np.broadcast_to(
            _tril(t, s), (2, t, s)
        )
    if how == "use_causal_and_masks":  # use_causal_mask + query/value masks
        return dict(use_causal_mask=True, query_mask=q, value_mask=k), dense & _tril(t, s)
    if how == "use_causal_and_rank3":  # use_causal_mask AND a full (B, T, S) mask
        return dict(use_causal_mask=True, attention_mask=dense), dense & _tril(t, s)
    raise AssertionError(how)


CASES = [
    ("rank3_padding", 5, 9, None),
    ("rank4_causal_by_value", 7, 7, 0),
    ("rank2_tril", 4, 9, None),
    ("use_causal_and_masks", 11, 5, 0),
    ("use_causal_and_rank3", 6, 13, 0),
]


def _grads(fn, weights, query, value):
    with tf.GradientTape() as tape:
        tape.watch([query, value, *weights])
        out = fn(query, value)
        w = tf.cast(tf.cos(tf.range(tf.size(out), dtype=tf.float64)), out.dtype)
        loss = tf.reduce_sum(out * tf.reshape(w, tf.shape(out)))
    return [out, *tape.gradient(loss, [query, value, *weights])]


# XLA for the run-time causal choice (a cond), padding and use_causal_mask
# with T > S; the other forms' XLA paths are the same ops (time budget).
XLA_CASES = ("rank3_padding", "rank4_causal_by_value", "use_causal_and_masks")
RUNS = [(*c, mode) for c in CASES for mode in MODES if mode != "xla" or c[0] in XLA_CASES]


@pytest.mark.parametrize("how,t,s,threshold,mode", RUNS, ids=[f"{r[0]}-{r[4]}" for r in RUNS])
def test_mask_forms_match_the_reference(rng, how, t, s, threshold, mode):
    """Forward and gradients; in graphs the dense mask is an argument, so
    it is checked and (without use_causal_mask) decided at run time."""
    layer = _layer(chunk_size=4, short_sequence_threshold=threshold)
    q = tf.constant(rng.normal(size=(2, t, DIM)), tf.float32)
    v = tf.constant(rng.normal(size=(2, s, DIM)), tf.float32)
    kwargs, dense = _case(how, rng, t, s)
    layer(q, v, **kwargs)
    tensors = {k: tf.constant(m) for k, m in kwargs.items() if k != "use_causal_mask"}
    flags = {k: m for k, m in kwargs.items() if k == "use_causal_mask"}
    call = in_mode(lambda q, v, masks: layer(q, v, **masks, **flags), mode)
    weights = [x.value for x in layer.weights]
    ours = _grads(lambda q, v: call(q, v, tensors), weights, q, v)
    w = layer_weights(layer)
    names = [x.path.split("/", 1)[1] for x in layer.weights]
    w64 = [w[n] for n in names]
    q64, v64 = tf.cast(q, tf.float64), tf.cast(v, tf.float64)
    ref = _grads(
        lambda q, v: masked_reference(dict(zip(names, w64, strict=True)), q, v, dense),
        w64,
        q64,
        v64,
    )
    if how != "rank2_tril":
        assert not np.all(dense.any(-1)), "the case has a fully masked row"
    for name, a, b in zip(["out", "d_query", "d_value", *names], ours, ref, strict=True):
        assert_close(f"masks {how} {name}", a, b, **TOL)


def test_scores_of_fully_masked_rows_are_uniform(rng):
    layer = _layer()
    x = rng.normal(size=(1, 4, DIM)).astype("float32")
    mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
    out, scores = layer(x, x, attention_mask=mask, return_attention_scores=True)
    scores = np.asarray(scores)
    np.testing.assert_allclose(scores[0, :, 2], 0.25)
    np.testing.assert_allclose(scores[0, :, [0, 1, 3], 2:], 0.0)
    np.testing.assert_allclose(out, layer(x, x, attention_mask=mask), rtol=1e-6)


def test_fully_masked_rows_equal_keras_mha(rng):
    """Keras's fused path gives a fully masked row the mean of all values,
    whatever the logits: there the two layers agree to rounding."""
    x = rng.normal(size=(2, 5, DIM)).astype("float32")
    ours, mha = _layer(), keras.layers.MultiHeadAttention(HEADS, KEY_DIM)
    mha(x, x)
    ours(x, x)
    ours.set_weights(mha.get_weights())
    mask = np.ones((2, 5, 5), bool)
    mask[0, 1:3] = False  # query padding
    mask[1] = False  # every key padded
    np.testing.assert_allclose(
        ours(x, x, attention_mask=mask)[0, 1:3], mha(x, x, attention_mask=mask)[0, 1:3], atol=1e-5
    )
    np.testing.assert_allclose(
        ours(x, x, attention_mask=mask)[1], mha(x, x, attention_mask=mask)[1], atol=1e-5
    )


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_causal_t_ne_s_with_run_time_lengths(rng, mode):
    layer = _layer(chunk_size=4)
    spec = [tf.TensorSpec((None, None, DIM)), tf.TensorSpec((None, None, DIM))]
    fn = tf.function(
        lambda q, v: layer(q, v, use_causal_mask=True),
        input_signature=spec,
        jit_compile=mode == "xla",
    )
    for t, s in ((9, 4), (3, 10)):
        q, v = rng.normal(size=(2, t, DIM)), rng.normal(size=(2, s, DIM))
        q, v = tf.constant(q, tf.float32), tf.constant(v, tf.float32)
        out = fn(q, v)
        ref = masked_reference(layer_weights(layer), q, v, np.broadcast_to(_tril(t, s), (2, t, s)))
        assert_close("masks causal run-time T != S", out, ref, **TOL)


REFUSED = [
    ("eye", np.eye(5, dtype=bool), False),
    ("random", np.random.default_rng(1).random((2, 5, 5)) > 0.5, False),
    ("triu", np.triu(np.ones((5, 5), bool)), False),
    ("tril offset", np.tril(np.ones((5, 5), bool), 1), False),
    (
        "heads differ",
        np.stack([np.ones((2, 5, 5), bool), _tril(5, 5)[None].repeat(2, 0)], 1),
        False,
    ),
    ("band with use_causal_mask", np.triu(_tril(5, 5), -1), True),
]


@pytest.mark.parametrize("name,mask,causal", REFUSED, ids=[r[0] for r in REFUSED])
def test_arbitrary_patterns_refused_in_every_mode(rng, name, mask, causal):
    layer = _layer()
    x = rng.normal(size=(2, 5, DIM)).astype("float32")
    run = lambda x, m: layer(x, x, attention_mask=m, use_causal_mask=causal)
    with pytest.raises(ValueError, match="`attention_mask`.* must be the same for every head"):
        run(x, mask)
    # A constant mask inside tf.function is read while tracing: ValueError.
    with pytest.raises(ValueError, match="`attention_mask`"):
        tf.function(lambda x: run(x, mask))(x)
    # A mask known only at run time: the graph assertion.
    with pytest.raises(tf.errors.InvalidArgumentError, match="`attention_mask`"):
        tf.function(run)(x, tf.constant(mask))
    # XLA drops assertions: the output is poisoned, never silently wrong.
    assert np.all(np.isnan(tf.function(run, jit_compile=True)(x, tf.constant(mask))))


def test_bottom_right_causal_is_refused_for_t_ne_s(rng):
    """Keras's causal mask for T != S is top-left `tril`; the bottom-right
    one (a KV-cache continuation) is another pattern and is refused."""
    layer = _layer()
    q, v = rng.normal(size=(1, 3, DIM)), rng.normal(size=(1, 6, DIM))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(q.astype("float32"), v.astype("float32"), attention_mask=np.tril(np.ones((3, 6)), 3))
