"""LinearMultiHeadAttention against the reference, and as a drop-in for MHA."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode, seeded_mha
from reference import favor, layer_reference, layer_weights, relu

import keras_linear_attention as kla

DIM, HEADS, KEY_DIM = 6, 2, 4
TOL = dict(rtol=2e-4, atol=2e-5)


def _layer(**kwargs):
    return seeded_mha(num_heads=HEADS, key_dim=KEY_DIM, **kwargs)


def _x(rng, *shape):
    return tf.constant(rng.normal(size=shape), tf.float32)


def _forward_and_grads(fn, weights, query, value):
    """Output, d/d inputs and d/d weights for a fixed cotangent."""
    weights = [getattr(w, "value", w) for w in weights]  # Keras -> tf.Variable
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([query, value, *weights])
        out = fn(query, value)
        w = tf.cast(tf.cos(tf.range(tf.size(out), dtype=tf.float64)), out.dtype)
        loss = tf.reduce_sum(out * tf.reshape(w, tf.shape(out)))
    return [out, *tape.gradient(loss, [query, value, *weights])]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "t,s,causal,masked",
    [(7, 7, False, False), (5, 11, False, True), (1, 1, True, False), (33, 33, True, True)],
)
def test_layer_matches_reference_with_gradients(rng, mode, t, s, causal, masked):
    layer = _layer(chunk_size=8, short_sequence_threshold=0)
    query, value = _x(rng, 2, t, DIM), _x(rng, 2, s, DIM)
    layer(query, value)
    mask = tf.constant(rng.random((2, s)) > 0.3) if masked else None
    if masked:
        mask = tf.concat([tf.ones((2, 1), tf.bool), mask[:, 1:]], 1)

    ours_fn = in_mode(lambda q, v: layer(q, v, value_mask=mask, use_causal_mask=causal), mode)
    ours = _forward_and_grads(ours_fn, layer.trainable_variables, query, value)

    names = [v.path.split("/", 1)[1] for v in layer.trainable_variables]
    w = layer_weights(layer)
    ref_vars = [w[n] for n in names]
    ref_fn = lambda q, v: layer_reference(
        dict(zip(names, ref_vars, strict=True)), q, v, key_mask=mask, causal=causal
    )
    ref = _forward_and_grads(
        ref_fn, ref_vars, tf.cast(query, tf.float64), tf.cast(value, tf.float64)
    )
    labels = ["out", "d query", "d value"] + [f"d {n}" for n in names]
    for label, a, b in zip(labels, ours, ref, strict=True):
        kind = "causal" if causal else "noncausal"
        assert_close(f"layer {kind} {label.split('/')[0]}", a, b, **TOL)


@pytest.mark.parametrize("name,phi", [("relu", relu), ("favor", None)])
def test_other_feature_maps_match_reference(rng, name, phi):
    fmap = kla.FavorFeatureMap(num_features=8, seed=0) if name == "favor" else name
    layer = _layer(feature_map=fmap)
    x = _x(rng, 2, 9, DIM)
    out = layer(x, x, use_causal_mask=True)
    if name == "favor":
        proj = layer.feature_map.projection.numpy()
        phi = lambda z: favor(z, proj)
    ref = layer_reference(layer_weights(layer), x, x, phi=phi, causal=True)
    assert_close(f"layer feature map {name}", out, ref, **TOL)


def test_use_gate_matches_reference(rng):
    layer = _layer(use_gate=True)
    x = _x(rng, 2, 5, DIM)
    assert_close(
        "layer gated", layer(x, x), layer_reference(layer_weights(layer), x, x, gate=True), **TOL
    )


def test_attention_mask_shapes_equal_key_padding(rng):
    layer = _layer()
    q, v = _x(rng, 2, 4, DIM), _x(rng, 2, 6, DIM)
    keys = np.array([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1]], bool)
    expected = layer(q, v, value_mask=keys)
    # Keras's layouts: (B, 1, S), (B, T, S), (B, heads, T, S), (B, 1, 1, S).
    for mask in (
        keys[:, None, :],
        np.repeat(keys[:, None, :], 4, axis=1),
        np.broadcast_to(keys[:, None, None, :], (2, 2, 4, 6)),
        keys[:, None, None, :],
    ):
        np.testing.assert_allclose(layer(q, v, attention_mask=mask), expected, rtol=1e-6)
    # A rank-2 mask is (T, S) for every batch row, as in Keras: (1, S) pads
    # the same keys everywhere.
    shared = layer(q, v, value_mask=np.repeat(keys[:1], 2, axis=0))
    np.testing.assert_allclose(layer(q, v, attention_mask=keys[:1]), shared, rtol=1e-6)
    ref = layer_reference(layer_weights(layer), q, v, key_mask=keys)
    assert_close("layer attention_mask", expected, ref, **TOL)


def test_causal_attention_mask_with_padding_accepted(rng):
    """A keras-hub-style (B, T, T) mask = padding & causal, with use_causal_mask."""
    layer = _layer()
    x = _x(rng, 2, 5, DIM)
    # (Key 0 padded would make row 0 fully masked: see the _masks tests.)
    keys = np.array([[1, 0, 1, 1, 1], [1, 1, 1, 0, 1]], bool)
    full = keys[:, None, :] & np.tril(np.ones((5, 5), bool))
    out = layer(x, x, attention_mask=full, use_causal_mask=True)
    ref = layer_reference(layer_weights(layer), x, x, key_mask=keys, causal=True)
    assert_close("layer causal+padding attention_mask", out, ref, **TOL)


def test_non_padding_attention_mask_refused_in_every_mode(rng):
    layer = _layer()
    x = _x(rng, 1, 4, DIM)
    eye = np.eye(4, dtype=bool)[None]  # neither padding nor padding × tril
    with pytest.raises(ValueError, match="key-padding and causal masking only"):
        layer(x, x, attention_mask=eye)
    # A constant mask is read while tracing; one known at run time only is
    # checked by a graph assertion.
    with pytest.raises(ValueError, match="key-padding and causal masking only"):
        tf.function(lambda x: layer(x, x, attention_mask=eye))(x)
    run = lambda x, m: layer(x, x, attention_mask=m)
    with pytest.raises(tf.errors.InvalidArgumentError, match="key-padding and causal"):
        tf.function(run)(x, tf.constant(eye))
    # XLA drops assertions: the output is poisoned instead of silently wrong.
    out = tf.function(run, jit_compile=True)(x, tf.constant(eye))
    assert np.all(np.isnan(out))


def test_implicit_keras_mask_from_embedding(rng):
    tokens = np.array([[3, 5, 2, 0, 0], [4, 1, 1, 1, 2]])
    inp = keras.Input((None,), dtype="int32")
    emb = keras.layers.Embedding(10, DIM, mask_zero=True)
    att = _layer()
    x = emb(inp)
    model = keras.Model(inp, att(x, x))
    out = model(tokens)
    e = emb(tokens)
    ref = layer_reference(layer_weights(att), e, e, key_mask=tokens != 0)
    # Padded queries are fully masked rows (Keras's value: see the _masks tests).
    real = tokens != 0
    assert_close("layer implicit mask", np.asarray(out)[real], np.asarray(ref)[real], **TOL)


def test_return_attention_scores(rng):
    layer = _layer()
    q, v = _x(rng, 2, 3, DIM), _x(rng, 2, 7, DIM)
    out, scores = layer(q, v, return_attention_scores=True)
    assert scores.shape == (2, HEADS, 3, 7)
    np.testing.assert_allclose(np.sum(scores, -1), 1.0, atol=1e-4)
    np.testing.assert_allclose(out, layer(q, v), rtol=1e-6)
    sym_out, sym_scores = layer(
        keras.Input((3, DIM)), keras.Input((7, DIM)), return_attention_scores=True
    )
    assert tuple(sym_scores.shape) == (None, HEADS, 3, 7)


def test_rank4_inputs_attend_over_flattened_positions(rng):
    layer = _layer()
    x = _x(rng, 2, 3, 4, DIM)
    out = layer(x, x)
    assert out.shape == x.shape
    flat = tf.reshape(x, (2, 12, DIM))
    ref = layer_reference(layer_weights(layer), flat, flat)
    assert_close("layer rank-4", tf.reshape(out, (2, 12, DIM)), ref, **TOL)
    with pytest.raises(ValueError, match="attention_axes"):
        _layer(attention_axes=(1,))(x, x)


def test_dropout_drops_keys_and_keeps_expectation(rng):
    layer = _layer(dropout=0.3, seed=0)
    x = _x(rng, 1, 6, DIM)
    clean = layer(x, x, training=False)
    np.testing.assert_array_equal(layer(x, x), clean)  # inference: no dropout
    draws = np.stack([layer(x, x, training=True) for _ in range(400)])
    assert not np.allclose(draws[0], clean)
    np.testing.assert_allclose(draws.mean(0), clean, atol=0.1 * np.abs(clean).max())


def test_weights_transfer_from_mha(rng):
    q, v = _x(rng, 2, 5, DIM), _x(rng, 2, 8, DIM)
    mha = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, use_gate=True)
    mha(q, v)
    lin = kla.LinearMultiHeadAttention(HEADS, KEY_DIM, use_gate=True)
    lin(q, v)
    assert [w.shape for w in lin.weights] == [w.shape for w in mha.weights]
    assert [w.path.split("/", 1)[1] for w in lin.weights] == [
        w.path.split("/", 1)[1] for w in mha.weights
    ]
    lin.set_weights(mha.get_weights())
    assert_close(
        "layer after MHA weights",
        lin(q, v),
        layer_reference(layer_weights(lin), q, v, gate=True),
        **TOL,
    )


def _transformer(attention_cls, vocab=12, length=16):
    inp = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, 16, mask_zero=True)(inp)
    for _ in range(2):
        a = attention_cls(num_heads=2, key_dim=8)(x, x)
        x = keras.layers.LayerNormalization()(x + a)
        f = keras.layers.Dense(16, activation="relu")(x)
        x = keras.layers.LayerNormalization()(x + f)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, keras.layers.Dense(2)(x))


def _task(rng, n=512, length=16):
    """Is token 7 present? Needs attention across the sequence."""
    x = rng.integers(1, 12, size=(n, length))
    x[rng.random((n, length)) < 0.05] = 0  # some padding
    y = (x == 7).any(1).astype("int32")
    return x, y


@pytest.mark.parametrize("jit_compile", [False, True])
def test_drop_in_transformer_trains_and_takes_mha_weights(rng, tmp_path, jit_compile):
    keras.utils.set_random_seed(0)
    mha_model = _transformer(keras.layers.MultiHeadAttention)
    mha_model.save_weights(tmp_path / "mha.weights.h5")
    lin_model = _transformer(kla.LinearMultiHeadAttention)
    kla.load_mha_weights(lin_model, str(tmp_path / "mha.weights.h5"))
    for a, b in zip(mha_model.get_weights(), lin_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    lin_model.set_weights(mha_model.get_weights())  # the in-memory route

    x, y = _task(rng)
    lin_model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    before = lin_model.evaluate(x, y, verbose=0)[0]
    history = lin_model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    after, acc = lin_model.evaluate(x, y, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < 0.6 * before and acc > 0.85, (before, after, acc)


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_config_and_keras_file_round_trip(rng, tmp_path, feature_map):
    fmap = kla.FavorFeatureMap(num_features=16, seed=4) if feature_map == "favor" else "elu"
    layer = _layer(
        feature_map=fmap, eps=1e-5, chunk_size=3, short_sequence_threshold=0, dropout=0.1
    )
    x = _x(rng, 2, 7, DIM)
    out = layer(x, x, use_causal_mask=True)
    clone = kla.LinearMultiHeadAttention.from_config(layer.get_config())
    clone(x, x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x, x, use_causal_mask=True), out, rtol=1e-6)
    assert clone.get_config() == layer.get_config()

    inp = keras.Input((None, DIM))
    model = keras.Model(inp, layer(inp, inp, use_causal_mask=True))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(x), out, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_mixed_precision_long_sequence(rng, policy, causal):
    n = 16384
    x = _x(rng, 1, n, 32) * 3.0
    ref_layer = kla.LinearMultiHeadAttention(num_heads=4, key_dim=16)
    expected = ref_layer(x, x, use_causal_mask=causal)
    keras.config.set_dtype_policy(policy)
    layer = kla.LinearMultiHeadAttention(num_heads=4, key_dim=16)
    layer(x[:, :2], x[:, :2])
    layer.set_weights(ref_layer.get_weights())
    out = layer(x, x, use_causal_mask=causal)
    assert out.dtype == policy.split("_")[1]
    out = np.asarray(tf.cast(out, tf.float32))
    assert np.all(np.isfinite(out))
    tol = 0.05 if policy == "mixed_float16" else 0.3  # bfloat16 has 8 mantissa bits
    err = np.max(np.abs(out - expected)) / np.max(np.abs(expected))
    assert err < tol, err


def test_keras_layer_as_trainable_feature_map(rng):
    fmap = keras.layers.Dense(8, activation="softplus", name="phi")
    layer = _layer(feature_map=fmap)
    x = _x(rng, 2, 5, DIM)
    with tf.GradientTape() as tape:
        out = layer(x, x, use_causal_mask=True)
        loss = tf.reduce_sum(out**2)
    phi_vars = [v for v in layer.trainable_variables if v.path.startswith(layer.name + "/phi")]
    assert len(phi_vars) == 2  # kernel and bias of φ train with the layer
    grads = tape.gradient(loss, [v.value for v in phi_vars])
    assert all(g is not None and np.any(np.asarray(g) != 0) for g in grads)
    w = {v.path.split("/", 1)[1]: tf.constant(v.numpy(), tf.float64) for v in phi_vars}
    phi = lambda z: tf.nn.softplus(z @ w["phi/kernel"] + w["phi/bias"])
    ref = layer_reference(layer_weights(layer), x, x, phi=phi, causal=True)
    assert_close("layer trainable feature map", out, ref, **TOL)
