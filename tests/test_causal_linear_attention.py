"""CausalLinearAttention: parallel == prefill + recurrent steps == reference."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, prefill_then_steps
from reference import layer_reference, layer_weights

import keras_linear_attention as kla

DIM, HEADS, KEY_DIM = 6, 2, 4
TOL = dict(rtol=2e-4, atol=2e-5)


def _layer(**kwargs):
    kwargs.setdefault("kernel_initializer", keras.initializers.RandomNormal(0.0, 0.5, seed=1))
    return kla.CausalLinearAttention(num_heads=HEADS, key_dim=KEY_DIM, **kwargs)


def _x(rng, *shape):
    return tf.constant(rng.normal(size=shape), tf.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_prefill_then_step_equals_parallel(rng, mode, feature_map):
    fmap = kla.FavorFeatureMap(num_features=8, seed=2) if feature_map == "favor" else "elu"
    layer = _layer(feature_map=fmap, chunk_size=4, short_sequence_threshold=0)
    x = _x(rng, 2, 19, DIM)
    full = layer(x)
    stepped, _, _ = prefill_then_steps(layer, x, 7, mode)
    assert_close(f"causal layer prefill+step ({feature_map})", stepped, full, **TOL)
    if feature_map == "elu":
        ref = layer_reference(layer_weights(layer), x, x, causal=True)
        assert_close("causal layer vs reference", full, ref, **TOL)


def test_state_after_prefill_equals_state_from_steps(rng):
    layer = _layer()
    x = _x(rng, 2, 10, DIM)
    _, prefill_state = layer(x, return_state=True)
    state = layer.get_initial_state(2)
    for t in range(10):
        _, state = layer(x[:, t : t + 1], initial_state=state, return_state=True)
    for a, b in zip(prefill_state, state, strict=True):
        assert_close("causal layer state prefill vs steps", a, b, rtol=1e-5, atol=1e-5)
    assert state[0].dtype == "float32"


def test_equals_linear_mha_with_causal_mask_and_mha_weights(rng):
    x = _x(rng, 2, 9, DIM)
    mha = keras.layers.MultiHeadAttention(HEADS, KEY_DIM)
    mha(x, x)
    causal, lin = _layer(), kla.LinearMultiHeadAttention(HEADS, KEY_DIM)
    causal(x)
    lin(x, x)
    causal.set_weights(mha.get_weights())
    lin.set_weights(mha.get_weights())
    assert_close(
        "causal layer vs LinearMHA causal",
        causal(x),
        lin(x, x, use_causal_mask=True),
        rtol=1e-6,
        atol=1e-7,
    )


def test_left_padding_and_implicit_mask(rng):
    tokens = np.array([[0, 0, 3, 5, 2], [4, 1, 1, 1, 2]])
    emb = keras.layers.Embedding(10, DIM, mask_zero=True)
    layer = _layer()
    inp = keras.Input((None,), dtype="int32")
    model = keras.Model(inp, layer(emb(inp)))
    e = emb(tokens)
    ref = layer_reference(layer_weights(layer), e, e, key_mask=tokens != 0, causal=True)
    assert_close("causal layer padding", model(tokens), ref, **TOL)
    assert_close("causal layer padding", layer(e, padding_mask=tokens != 0), ref, **TOL)


def test_xla_dynamic_shapes_and_model_fit(rng):
    layer = _layer()
    fn = tf.function(
        lambda x: layer(x), jit_compile=True, input_signature=[tf.TensorSpec((None, None, DIM))]
    )
    for batch, n in [(1, 1), (3, 70), (2, 64)]:
        x = _x(rng, batch, n, DIM)
        assert_close(
            "causal layer xla dynamic",
            fn(x),
            layer_reference(layer_weights(layer), x, x, causal=True),
            **TOL,
        )
    inp = keras.Input((None, DIM))
    model = keras.Model(inp, keras.layers.Dense(1)(layer(inp)))
    model.compile("adam", "mse", jit_compile=True)
    x = _x(rng, 16, 12, DIM)
    history = model.fit(x, tf.reduce_sum(x, -1, keepdims=True), epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_keras_file_round_trip(rng, tmp_path):
    layer = _layer(
        feature_map=kla.FavorFeatureMap(seed=1), chunk_size=5, short_sequence_threshold=0
    )
    inp = keras.Input((None, DIM))
    model = keras.Model(inp, layer(inp))
    x = _x(rng, 2, 11, DIM)
    model.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    clone = loaded.layers[-1]
    assert isinstance(clone, kla.CausalLinearAttention)
    as_json = lambda c: json.loads(json.dumps(c))  # tuples -> lists
    assert as_json(clone.get_config()) == as_json(layer.get_config())


def test_symbolic_state_outputs():
    layer = _layer()
    inp = keras.Input((None, DIM))
    out, (kv, k_sum) = layer(inp, return_state=True)
    assert tuple(kv.shape) == (None, HEADS, KEY_DIM, KEY_DIM)
    assert tuple(k_sum.shape) == (None, HEADS, KEY_DIM)
    assert layer.state_shapes == ((HEADS, KEY_DIM, KEY_DIM), (HEADS, KEY_DIM))


@pytest.mark.parametrize("causal_mha", [False, True])
def test_training_step_working_set_is_bounded(causal_mha):
    """Peak TF CPU allocator use of one forward+backward `tf.function` step,
    in units of the input's size (N × 512 float32). TF's executor runs every
    gradient op whose inputs are ready; before the backward passes were
    ordered (`ops._common.after`), recomputed scores and min(φ, 1) ran in
    the forward pass and stayed alive: 13-16 units here, 10.1-10.2 since."""
    layer = kla.LinearMultiHeadAttention(8, 64) if causal_mha else kla.CausalLinearAttention(8, 64)
    call = (lambda x: layer(x, x, use_causal_mask=True)) if causal_mha else layer
    x = tf.random.normal((1, 8192, 512))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(call(x))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    step(x)
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step(x)
    units = (tf.config.experimental.get_memory_info("CPU:0")["peak"] - before) / x.numpy().nbytes
    assert units <= 12, units
