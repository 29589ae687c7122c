"""Encoder/decoder blocks: masks, causality, the recurrent state, serialization, XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode

import keras_linear_attention as kla
from keras_linear_attention import LinearTransformerDecoder, LinearTransformerEncoder


def _x(rng, shape):
    return tf.constant(rng.normal(size=shape).astype("float32"))


@pytest.mark.parametrize("normalize_first", [True, False])
@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_encoder_padding_does_not_change_real_positions(rng, normalize_first, attention):
    block = LinearTransformerEncoder(32, 2, normalize_first=normalize_first, attention=attention)
    x = _x(rng, (1, 9, 16))
    padded = tf.concat([x, _x(rng, (1, 4, 16))], axis=1)
    mask = tf.constant([[True] * 9 + [False] * 4])
    assert_close(
        "block padding invariance", block(padded, padding_mask=mask)[:, :9], block(x), 1e-5, 1e-5
    )


@pytest.mark.parametrize("mode", MODES)
def test_decoder_is_causal_in_every_mode(rng, mode):
    block = LinearTransformerDecoder(32, 2)
    x = _x(rng, (2, 20, 16))
    changed = tf.concat([x[:, :12], _x(rng, (2, 8, 16))], axis=1)
    run = in_mode(lambda t: block(t), mode)
    assert_close("decoder causality", run(changed)[:, :12], run(x)[:, :12], 1e-5, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_decoder_prefill_then_steps_equals_parallel(rng, mode):
    block = LinearTransformerDecoder(32, 2)
    x = _x(rng, (2, 11, 16))
    full = block(x)
    run = in_mode(lambda t, s: block(t, initial_state=s, return_state=True), mode)
    out, state = block(x[:, :6], return_state=True)
    outs = [out]
    for i in range(6, 11):
        out, state = run(x[:, i : i + 1], state)
        outs.append(out)
    assert_close("decoder prefill+step", tf.concat(outs, axis=1), full, 1e-5, 1e-5)


def test_decoder_state_from_prefill_equals_stepping(rng):
    block = LinearTransformerDecoder(32, 2)
    x = _x(rng, (1, 7, 16))
    _, prefilled = block(x, return_state=True)
    state = block.get_initial_state(1)
    for i in range(7):
        _, state = block(x[:, i : i + 1], initial_state=state, return_state=True)
    for a, b in zip(prefilled, state, strict=True):
        assert_close("decoder state prefill vs steps", a, b, 1e-5, 1e-5)


def test_decoder_cross_attention_sees_encoder_padding(rng):
    block = LinearTransformerDecoder(32, 2)
    x, enc = _x(rng, (1, 5, 16)), _x(rng, (1, 6, 12))
    padded = tf.concat([enc, _x(rng, (1, 3, 12))], axis=1)
    mask = tf.constant([[True] * 6 + [False] * 3])
    expected = block(x, encoder_outputs=enc)
    actual = block(x, encoder_outputs=padded, encoder_padding_mask=mask)
    assert_close("cross-attention padding", actual, expected, 1e-5, 1e-5)
    with pytest.raises(ValueError, match="encoder_outputs"):
        block(x)


def test_softmax_decoder_has_no_state(rng):
    block = LinearTransformerDecoder(32, 2, attention="softmax")
    with pytest.raises(ValueError, match="softmax attention has no recurrent state"):
        block(_x(rng, (1, 4, 16)), return_state=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 0, "intermediate_dim": 8}, "num_heads"),
        ({"num_heads": 2, "intermediate_dim": 8, "dropout": 1.5}, "dropout"),
        ({"num_heads": 2, "intermediate_dim": 8, "attention": "flash"}, "attention"),
    ],
)
def test_block_arguments_are_checked(kwargs, match):
    for cls in (LinearTransformerEncoder, LinearTransformerDecoder):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


def test_heads_must_divide_width(rng):
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        LinearTransformerEncoder(8, 3)(_x(rng, (1, 4, 16)))


@pytest.mark.parametrize("cls", [LinearTransformerEncoder, LinearTransformerDecoder])
def test_blocks_round_trip_through_keras_files(tmp_path, rng, cls):
    inputs = keras.Input((None, 16))
    model = keras.Model(inputs, cls(32, 2, feature_map="favor", dropout=0.1)(inputs))
    x = _x(rng, (2, 9, 16))
    path = str(tmp_path / "block.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert_close("block save/load", loaded(x), model(x), 1e-6, 1e-6)
    assert loaded.layers[1].get_config() == model.layers[1].get_config()


def test_block_trains_under_xla_and_mixed_precision(rng):
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((None, 16))
    x = LinearTransformerDecoder(32, 2)(LinearTransformerEncoder(32, 2)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(x))
    model.compile("adam", "mse", jit_compile=True)
    history = model.fit(rng.normal(size=(16, 12, 16)), rng.normal(size=(16, 12, 1)), verbose=0)
    assert np.isfinite(history.history["loss"][0])


def _self_attention(block):
    return getattr(block, "_attention_layer", None) or block._self_attention


def _custom_phi(rng):
    """A trainable φ with weights of its own (not what a fresh one draws)."""
    phi = keras.layers.Dense(8, activation="softplus", name="phi")
    phi.build((None, None, 2, 8))
    phi.set_weights([rng.normal(size=(8, 8)).astype("float32"), np.full(8, 0.5, "float32")])
    return phi


@pytest.mark.parametrize("cls", [LinearTransformerEncoder, LinearTransformerDecoder])
def test_blocks_use_the_feature_map_instance_they_are_given(rng, cls):
    phi = _custom_phi(rng)
    kernel = phi.get_weights()[0]
    block = cls(32, 2, feature_map=phi)
    x = _x(rng, (2, 7, 16))
    out = block(x)
    assert _self_attention(block).feature_map is phi
    np.testing.assert_array_equal(phi.get_weights()[0], kernel)
    # The same block with a fresh φ from the config: only φ's weights differ.
    fresh = cls.from_config(block.get_config())
    fresh(x)
    fresh_phi = _self_attention(fresh).feature_map
    assert fresh_phi is not phi
    for mine, theirs in zip(block.weights, fresh.weights, strict=True):
        if not any(mine is w for w in phi.weights):
            theirs.assign(mine)
    assert np.max(np.abs(fresh(x) - out)) > 1e-3
    fresh_phi.set_weights(phi.get_weights())
    assert_close("block with the given φ", fresh(x), out, 1e-6, 1e-6)


def test_decoder_cross_attention_gets_its_own_feature_map(rng):
    fm = kla.FavorFeatureMap(num_features=16, seed=5)
    block = LinearTransformerDecoder(32, 2, feature_map=fm)
    block(_x(rng, (1, 5, 16)), encoder_outputs=_x(rng, (1, 6, 12)))
    cross = block._cross_attention.feature_map
    assert block._self_attention.feature_map is fm and cross is not fm
    assert cross.get_config() | {"name": fm.name} == fm.get_config()
    np.testing.assert_array_equal(cross.projection, fm.projection)  # same seed


def test_one_feature_map_instance_cannot_serve_two_blocks(rng):
    fm = kla.FavorFeatureMap(seed=5)
    first = LinearTransformerEncoder(32, 2, feature_map=fm)
    first(_x(rng, (1, 4, 16)))
    with pytest.raises(ValueError, match="already used by the attention layer 'self_attention'"):
        LinearTransformerEncoder(32, 2, feature_map=fm)(_x(rng, (1, 4, 16)))


@pytest.mark.parametrize("cls", [LinearTransformerEncoder, LinearTransformerDecoder])
def test_block_with_a_given_feature_map_round_trips_through_keras_files(tmp_path, rng, cls):
    inputs = keras.Input((None, 16))
    block = cls(32, 2, feature_map=_custom_phi(rng))
    model = keras.Model(inputs, block(inputs))
    x = _x(rng, (2, 9, 16))
    model.save(tmp_path / "block.keras")
    loaded = keras.models.load_model(tmp_path / "block.keras")
    assert_close("block with given φ save/load", loaded(x), model(x), 1e-6, 1e-6)
    loaded_phi = _self_attention(loaded.layers[1]).feature_map
    phi = _self_attention(block).feature_map
    np.testing.assert_array_equal(loaded_phi.get_weights()[0], phi.get_weights()[0])


@pytest.mark.parametrize("cls", ["TransformerEncoder", "TransformerDecoder"])
def test_arguments_are_keras_hubs(cls):
    """`(intermediate_dim, num_heads, ...)` and `normalize_first`, as keras-hub's
    blocks take them: `Block(64, 4)` means the same in both libraries."""
    ours = getattr(kla, f"Linear{cls}")(64, 4, normalize_first=False)
    assert (ours.intermediate_dim, ours.num_heads, ours.normalize_first) == (64, 4, False)
    assert ours.get_config()["normalize_first"] is False
    keras_hub = pytest.importorskip("keras_hub")
    theirs = getattr(keras_hub.layers, cls)(64, 4, normalize_first=False)
    assert (theirs.intermediate_dim, theirs.num_heads) == (64, 4)
