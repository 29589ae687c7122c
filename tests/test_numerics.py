"""Numerics at the edges: long half-precision sequences, all-zero feature
rows, eps=0, and a mixed_float16 training run without NaN."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, in_mode

import keras_linear_attention as kla


def _long_inputs(n, dtype, scale, heads=1, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    phi = lambda x: np.where(x > 0, x + 1, np.exp(x))  # elu + 1
    q, k = (phi(scale * rng.normal(size=(1, n, heads, dim))) for _ in "qk")
    v = scale * rng.normal(size=(1, n, heads, dim))
    return [tf.constant(x, dtype) for x in (q, k, v)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_long_half_precision_sequence_stays_finite_and_close(dtype):
    """N = 65536 with large-scale inputs: Σφ(k) reaches ~1e6, far past float16's
    65504, so the states must be summed in float32 (they are)."""
    n = 65536
    q, k, v = _long_inputs(n, dtype, scale=4.0)
    ref = kla.causal_linear_attention(*(tf.cast(x, tf.float32) for x in (q, k, v)))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = kla.causal_linear_attention(q, k, v)
        loss = tf.reduce_sum(tf.cast(out, tf.float32))
    grads = tape.gradient(loss, [q, k, v])
    assert out.dtype == dtype
    k_total = float(tf.reduce_max(tf.reduce_sum(tf.cast(k, tf.float32), axis=1)))
    assert k_total > 65504  # the test is meaningful: float16 sums would overflow
    for g in (out, *grads):
        assert np.all(np.isfinite(tf.cast(g, tf.float32).numpy()))
    # Half-precision inputs and outputs: compare at their resolution.
    err = np.abs(tf.cast(out, tf.float32).numpy() - ref.numpy())
    tol = 3e-2 if dtype == "bfloat16" else 4e-3
    assert np.max(err / (1 + np.abs(ref.numpy()))) < tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("causal", [False, True])
def test_all_zero_feature_rows_give_zero_and_finite_gradients(mode, eps, causal):
    """relu on all-negative inputs zeroes whole φ rows (queries 0-2, keys 0-3 here).
    Documented fallback: such rows output 0, with finite gradients, even with eps=0."""
    fmap = kla.feature_maps.get("relu")
    x_q = tf.constant(np.linspace(-3, 2, 6 * 4).reshape(1, 6, 1, 4), tf.float32)
    x_k = tf.constant(np.linspace(-4, 1, 6 * 4).reshape(1, 6, 1, 4), tf.float32)
    v = tf.constant(np.linspace(-1, 1, 6 * 3).reshape(1, 6, 1, 3), tf.float32)
    op = kla.causal_linear_attention if causal else kla.linear_attention

    def fn(x_q, x_k, v):
        with tf.GradientTape() as tape:
            tape.watch([x_q, x_k, v])
            out = op(fmap(x_q), fmap(x_k), v, eps=eps)
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, [x_q, x_k, v])

    out, grads = in_mode(fn, mode)(x_q, x_k, v)
    for t in (out, *grads):
        assert np.all(np.isfinite(t.numpy()))
    phi_q, phi_k = fmap(x_q).numpy(), fmap(x_k).numpy()
    assert np.all(phi_q[0, :3] == 0) and np.all(phi_k[0, :4] == 0) and np.any(phi_k[0, 4])
    np.testing.assert_array_equal(out.numpy()[0, :3], 0.0)  # zero query rows
    assert np.all(out.numpy()[0, 4:] != 0)  # later rows see non-zero keys
    if causal:  # position 3 has a non-zero query but sees only zero keys
        np.testing.assert_array_equal(out.numpy()[0, 3], 0.0)


def test_every_key_padded_gives_zero_not_nan():
    q = k = tf.ones((1, 5, 2, 4))
    v = tf.ones((1, 5, 2, 3))
    mask = tf.zeros((1, 5), tf.bool)
    for op in (kla.linear_attention, kla.causal_linear_attention):
        out = op(q, k, v, key_mask=mask, eps=0.0)
        np.testing.assert_array_equal(out.numpy(), 0.0)


def test_mixed_float16_training_has_no_nan_loss():
    """A few hundred optimizer steps under mixed_float16 (loss scaling on)."""
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = kla.build_causal_lm(32, sequence_length=64, hidden_dim=32, num_layers=2, num_heads=2)
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    # Learnable structure (each token repeats the previous one), so the loss moves.
    tokens = np.repeat(rng.integers(0, 32, (256, 33)), 2, axis=1)[:, :65]
    history = model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=8, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert model.get_layer("decoder_0").compute_dtype == "float16"
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0]
