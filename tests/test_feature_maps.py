"""Feature maps: values, the softmax approximation, seeds, redraws, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode
from reference import elu_plus_one, favor, relu

import keras_linear_attention as kla
from keras_linear_attention import feature_maps


@pytest.mark.parametrize("name,ref", [("elu", elu_plus_one), ("relu", relu)])
def test_elementwise_maps(rng, name, ref):
    x = rng.normal(size=(2, 5, 3, 4)).astype("float32")
    fm = feature_maps.get(name)
    assert_close(f"feature map {name}", fm(x), ref(tf.constant(x, tf.float64)), 1e-6, 1e-6)
    assert np.all(np.asarray(fm(x)) >= 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_elu_gradient_matches_reference(rng, mode, dtype):
    """elu+1 has a hand-written gradient, min(φ, 1); check it on both
    branches, at 0 exactly (elu'(0) = 1) and far out on either side."""
    x = np.concatenate([rng.normal(size=60) * 3, [0.0, -30.0, 30.0, -1e-4, 1e-4]])
    x = tf.constant(x.reshape(1, 13, 5), dtype)

    def grad(fn, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
            weights = tf.reshape(tf.range(tf.size(y), dtype=tf.float32) % 7, tf.shape(y))
            loss = tf.reduce_sum(y * tf.cast(weights, y.dtype))
        return y, tape.gradient(loss, x)

    ours = in_mode(lambda x: grad(feature_maps.get("elu"), x), mode)(x)
    expected = grad(elu_plus_one, tf.cast(x, tf.float64))
    tol = 1e-6 if dtype == "float32" else 2e-3
    for name, a, b in zip(["value", "gradient"], ours, expected, strict=True):
        assert_close(f"elu+1 {name} ({dtype})", a, b, tol, tol)


def test_favor_matches_formula_and_is_positive(rng):
    x = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    fm = kla.FavorFeatureMap(num_features=32, seed=1)
    out = fm(x)
    assert out.shape == (2, 5, 3, 32)
    assert_close(
        "feature map favor",
        out,
        favor(tf.constant(x, tf.float64), fm.projection.numpy()),
        1e-5,
        1e-6,
    )
    assert np.all(np.asarray(out) > 0)


def test_favor_projection_is_orthogonal_within_blocks():
    w = feature_maps.orthogonal_random_features(16, 16, seed=3).numpy()
    directions = w / np.linalg.norm(w, axis=0, keepdims=True)
    np.testing.assert_allclose(directions.T @ directions, np.eye(16), atol=1e-5)


def test_favor_approximates_softmax_kernel(rng):
    """E[φ(q)·φ(k)] = exp(q·k/√d): with many features the estimate is close."""
    d = 8
    q = rng.normal(size=(64, d)).astype("float32") * 0.5
    k = rng.normal(size=(64, d)).astype("float32") * 0.5
    fm = kla.FavorFeatureMap(num_features=4096, seed=0)
    approx = np.asarray(fm(q)) @ np.asarray(fm(k)).T
    exact = np.exp(q @ k.T / np.sqrt(d))
    rel = np.abs(approx - exact) / exact
    assert np.median(rel) < 0.025, np.median(rel)  # measured 0.011


def test_favor_seed_reproducible_and_redraw():
    x = keras.ops.ones((1, 2, 1, 4))
    a, b = kla.FavorFeatureMap(seed=7), kla.FavorFeatureMap(seed=7)
    np.testing.assert_array_equal(a(x), b(x))
    assert not np.array_equal(a(x), kla.FavorFeatureMap(seed=8)(x))
    r = kla.FavorFeatureMap(seed=7, redraw_interval=2)
    r(x)
    w0 = r.projection.numpy()
    r.redraw_if_due(training=False)
    np.testing.assert_array_equal(r.projection.numpy(), w0)  # never at inference
    r.redraw_if_due(training=True)
    np.testing.assert_array_equal(r.projection.numpy(), w0)  # call 1: not due
    r.redraw_if_due(training=True)
    assert not np.array_equal(r.projection.numpy(), w0)  # call 2: redrawn


@keras.saving.register_keras_serializable(package="tests")
def squared(x):
    return keras.ops.square(x)


@pytest.mark.parametrize(
    "identifier",
    [
        "elu",
        "relu",
        kla.FavorFeatureMap(num_features=12, seed=3, redraw_interval=5),
        squared,
        keras.layers.Dense(6, activation="softplus"),
    ],
)
def test_feature_map_round_trip(identifier):
    fm = feature_maps.get(identifier)
    x = np.linspace(-1, 1, 2 * 3 * 4).reshape(1, 2, 3, 4).astype("float32")
    y = fm(x)
    config = feature_maps.serialize(fm)
    clone = feature_maps.get(config)
    if not clone.built:
        clone.build(x.shape)
    clone.set_weights(fm.get_weights())
    np.testing.assert_allclose(clone(x), y, rtol=1e-6)
    assert feature_maps.output_dim(fm, 4) == y.shape[-1]


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="Unknown `feature_map` 'softmax'"):
        feature_maps.get("softmax")
    with pytest.raises(TypeError, match="`feature_map` must be"):
        feature_maps.get(3)
    with pytest.raises(ValueError, match="num_features"):
        kla.FavorFeatureMap(num_features=0)
