"""Hostile inputs, tried systematically: each case works (checked against the
float64 reference) or raises an error that names the problem. The outcome
table is in README "Hostile inputs"; `test_bad_inputs.py` has the argument
checks (ranks, dtypes, dims, mask shapes, zero lengths).
"""

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import kernel_attention, layer_reference, layer_weights

import keras_linear_attention as kla
from keras_linear_attention.generation import RecurrentLM


def _phi(rng, shape):
    return np.where((x := rng.normal(size=shape)) > 0, x + 1, np.exp(x))


# ---------------------------------------------------------------- properties
@st.composite
def attention_problems(draw):
    causal = draw(st.booleans())
    t = draw(st.integers(1, 24))
    s = t if causal else draw(st.integers(1, 24))
    dims = dict(b=draw(st.integers(1, 3)), h=draw(st.integers(1, 3)))
    d, m = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    mask = draw(st.lists(st.booleans(), min_size=dims["b"] * s, max_size=dims["b"] * s))
    chunk = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    return (
        causal,
        (dims["b"], t, s, dims["h"], d, m),
        np.array(mask).reshape(dims["b"], s),
        chunk,
        seed,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_problems())
def test_any_shape_and_mask_matches_the_reference(problem):
    """Random shapes, chunk sizes and masks (all-padded rows included: they
    give 0, the documented fallback) against the explicit float64 matrix."""
    causal, (b, t, s, h, d, m), mask, chunk, seed = problem
    rng = np.random.default_rng(seed)
    q, k = _phi(rng, (b, t, h, d)), _phi(rng, (b, s, h, d))
    v = rng.normal(size=(b, s, h, m))
    if causal:
        out = kla.causal_linear_attention(
            q, k, v, key_mask=mask, chunk_size=chunk, short_sequence_threshold=0
        )
    else:
        out = kla.linear_attention(q, k, v, key_mask=mask)
    expected = kernel_attention(q, k, v, key_mask=mask, causal=causal)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- works
def test_nan_and_inf_in_padded_positions_do_not_leak():
    rng = np.random.default_rng(0)
    q, k = _phi(rng, (1, 6, 2, 4)), _phi(rng, (1, 6, 2, 4))
    v = rng.normal(size=(1, 6, 2, 3))
    mask = np.array([[True, True, True, True, False, False]])
    clean = kla.linear_attention(q, k, v, key_mask=mask)
    k[:, 4], v[:, 4], k[:, 5], v[:, 5] = np.nan, np.inf, np.inf, np.nan
    for op in (kla.linear_attention, kla.causal_linear_attention):
        out = op(q, k, v, key_mask=mask).numpy()
        assert np.all(np.isfinite(out))
    np.testing.assert_allclose(kla.linear_attention(q, k, v, key_mask=mask), clean)


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_nan_in_a_visible_value_is_loud_never_finite_but_wrong(chunk):
    """A NaN value makes its own and every later output NaN. Earlier outputs
    are either exact or NaN (0·NaN in a masked matmul, as in softmax attention's
    masked N×N product): never a finite wrong number."""
    rng = np.random.default_rng(0)
    q, k, v = _phi(rng, (1, 6, 1, 4)), _phi(rng, (1, 6, 1, 4)), rng.normal(size=(1, 6, 1, 3))
    clean = kla.causal_linear_attention(q, k, v).numpy()  # exact for positions < 3
    v[0, 3] = np.nan
    out = kla.causal_linear_attention(q, k, v, chunk_size=chunk, short_sequence_threshold=0).numpy()
    assert np.all(np.isnan(out[0, 3:]))
    early, expected = out[0, :3], clean[0, :3]
    finite = np.isfinite(early)
    np.testing.assert_allclose(early[finite], expected[finite], rtol=1e-12)
    assert np.all(np.isnan(kla.linear_attention(q, k, v).numpy()))


@pytest.mark.parametrize(
    "make",
    [
        lambda: kla.LinearMultiHeadAttention(2, 4),
        lambda: kla.CausalLinearAttention(2, 4),
    ],
)
@pytest.mark.parametrize("length", [1, 5])
def test_empty_batch_and_length_one(make, length):
    layer = make()
    for batch in (0, 3):
        x = np.ones((batch, length, 8), "float32")
        out = layer(x) if isinstance(layer, kla.CausalLinearAttention) else layer(x, x)
        assert out.shape == (batch, length, 8)
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("causal", [False, True])
def test_huge_head_count(causal):
    """512 heads of width 1: many tiny heads still match the reference."""
    rng = np.random.default_rng(0)
    q, k, v = (
        _phi(rng, (1, 40, 512, 1)),
        _phi(rng, (1, 40, 512, 1)),
        rng.normal(size=(1, 40, 512, 1)),
    )
    op = kla.causal_linear_attention if causal else kla.linear_attention
    np.testing.assert_allclose(op(q, k, v), kernel_attention(q, k, v, causal=causal), rtol=1e-9)
    layer = kla.LinearMultiHeadAttention(num_heads=512, key_dim=1)
    x = rng.normal(size=(1, 7, 16)).astype("float32")
    assert layer(x, x, use_causal_mask=causal).shape == (1, 7, 16)


# ------------------------------------------- masks, chunks and states (issue 15)
SPEC_BT8 = tf.TensorSpec((None, None, 8))


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_rank2_attention_mask_is_t_by_s_as_in_keras(rng, batch):
    """Keras reads a rank-2 mask as (T, S) for every batch row: `tril` is the
    causal mask. It never changes the batch (it did: (1, 5, 8) gave (5, 5, 8)),
    and with B = T it is never read as per-batch key padding."""
    layer = kla.LinearMultiHeadAttention(2, 4)
    x = rng.normal(size=(batch, 5, 8)).astype("float32")
    tril = np.tril(np.ones((5, 5), bool))
    causal = layer(x, x, use_causal_mask=True)
    ref = layer_reference(layer_weights(layer), x, x, causal=True)
    np.testing.assert_allclose(causal, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x, x, attention_mask=tril, use_causal_mask=True), causal)
    # Without use_causal_mask, tril is read as causal by its values (issue 18);
    # a pattern that is neither padding nor causal is refused in every mode.
    np.testing.assert_allclose(layer(x, x, attention_mask=tril), causal)
    eye = np.eye(5, dtype=bool)
    with pytest.raises(ValueError, match="not query padding times key padding"):
        layer(x, x, attention_mask=eye)
    run = lambda x, m: layer(x, x, attention_mask=m)  # a mask known at run time only
    spec = [SPEC_BT8, tf.TensorSpec((5, 5), tf.bool)]
    with pytest.raises(tf.errors.InvalidArgumentError, match="not query padding times key"):
        tf.function(run, input_signature=spec)(x, eye)
    out = tf.function(run, input_signature=spec, jit_compile=True)(x, eye)
    assert out.shape == x.shape and np.all(np.isnan(out))


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_attention_mask_batch_is_checked_when_batch_is_dynamic(rng, mode):
    layer = kla.LinearMultiHeadAttention(2, 4)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    keys = rng.random((2, 1, 5)) > 0.3
    keys[..., 0] = True
    spec = [SPEC_BT8, tf.TensorSpec((None, 1, None), tf.bool)]
    fn = tf.function(
        lambda x, m: layer(x, x, attention_mask=m), input_signature=spec, jit_compile=mode == "xla"
    )
    np.testing.assert_allclose(fn(x, keys), layer(x, x, value_mask=keys[:, 0]), atol=1e-6)
    np.testing.assert_allclose(
        fn(x, keys[:1]), layer(x, x, value_mask=np.repeat(keys[:1, 0], 2, 0)), atol=1e-6
    )
    wrong = np.ones((3, 1, 5), bool)
    if mode == "xla":  # XLA drops assertions: poisoned, not silently wrong.
        assert np.all(np.isnan(fn(x, wrong)))
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="its batch axis is neither"):
            fn(x, wrong)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("chunk_size", [10**6, 4096])
def test_chunk_larger_than_a_dynamic_length(rng, mode, chunk_size):
    """The chunk is min(chunk_size, N), also when N is known only at run time
    (10**6 failed to trace; under XLA it asked for 22.5 TiB)."""
    layer = kla.LinearMultiHeadAttention(2, 4, chunk_size=chunk_size, short_sequence_threshold=0)
    x = tf.constant(rng.normal(size=(2, 13, 8)).astype("float32"))
    layer.build(x.shape, x.shape)
    ref = layer_reference(layer_weights(layer), x, x, causal=True)

    def loss_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, x, use_causal_mask=True)
            loss = tf.reduce_sum(out**2)
        return out, tape.gradient(loss, x)

    fn = tf.function(loss_and_grad, input_signature=[SPEC_BT8], jit_compile=mode == "xla")
    out, grad = fn(x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, loss_and_grad(x)[1], rtol=1e-4, atol=1e-5)


def test_chunk_length_never_exceeds_the_sequence():
    from keras_linear_attention.ops._chunked import chunk_for

    dynamic = tf.function(lambda x: chunk_for(4096, x), input_signature=[SPEC_BT8])
    assert int(dynamic(tf.zeros((1, 13, 8)))) == 13
    assert int(dynamic(tf.zeros((1, 5000, 8)))) == 4096
    assert chunk_for(4096, tf.zeros((1, 13, 8))) == 13


def _bad_batch_state_cases():
    layer = kla.CausalLinearAttention(2, 4)
    layer(np.ones((8, 1, 8), "float32"))
    state_spec = (tf.TensorSpec((None, 2, 4, 4)), tf.TensorSpec((None, 2, 4)))
    layer_fn = tf.function(
        lambda x, s: layer(x, initial_state=s, return_state=True),
        input_signature=[SPEC_BT8, state_spec],
    )
    step_fn = tf.function(
        lambda q, s: kla.ops.linear_attention_step(q, q, q, s),
        input_signature=[tf.TensorSpec((None, 2, 4)), state_spec],
    )
    return [
        (layer_fn, np.ones((8, 1, 8), "float32"), layer.get_initial_state),
        (step_fn, np.ones((8, 2, 4), "float32"), lambda b: kla.ops.zero_state(b, 2, 4, 4)),
    ]


def test_state_of_another_batch_is_named_in_graphs():
    """With a dynamic batch the shape check runs in the graph, before any op
    could fail with "Incompatible shapes" of its own."""
    for fn, x, make_state in _bad_batch_state_cases():
        assert fn(x, make_state(8))[0].shape[0] == 8
        with pytest.raises(
            tf.errors.InvalidArgumentError, match=r"`initial_state\[0\] \(kv\)` must have shape"
        ):
            fn(x, make_state(4))


def test_state_of_another_batch_in_the_recurrent_lm_graph(lm):
    runner = RecurrentLM(lm, jit_compile=False)
    states = runner.get_initial_state(4)
    state_spec = tuple(tf.TensorSpec((None, *s.shape[1:])) for s in states)
    spec = [tf.TensorSpec((None,), tf.int32), state_spec]
    step = tf.function(lambda t, s: runner.step(t, s, 3), input_signature=spec)
    assert step(tf.constant([1, 2, 3, 4]), states)[0].shape == (4, 11)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"initial_state\[0\] \(kv\)"):
        step(tf.constant([1, 2]), states)


# ---------------------------------------------------------------- clear errors
@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(0)
    return kla.build_causal_lm(11, sequence_length=16, hidden_dim=8, num_layers=2, num_heads=2)


@pytest.mark.parametrize(
    "states, pattern",
    [
        (
            lambda s: s[:3],
            r"`states` must hold 4 tensors \(kv_0, k_sum_0, kv_1, k_sum_1\); received 3",
        ),
        (lambda s: (s[1], s[0], *s[2:]), r"`initial_state\[0\] \(kv\)` must have shape"),
        (lambda s: (s[0][:, :1], *s[1:]), r"`initial_state\[0\] \(kv\)` must have shape"),
        (lambda s: (tf.cast(s[0], tf.int32), *s[1:]), r"must be a floating-point tensor"),
    ],
)
def test_mismatched_states_to_the_recurrent_step(lm, states, pattern):
    runner = RecurrentLM(lm, jit_compile=False)
    good = runner.get_initial_state(2)
    with pytest.raises((ValueError, TypeError), match=pattern):
        runner.step(tf.constant([1, 2]), states(good), 0)


def _saved(lm, tmp_path):
    path = tmp_path / "lm.keras"
    lm.save(path)
    return path


def test_corrupt_keras_file_raises(lm, tmp_path):
    path = tmp_path / "corrupt.keras"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="zip|Zip|not a valid|File format"):
        keras.saving.load_model(path)


def test_truncated_keras_file_raises(lm, tmp_path):
    data = _saved(lm, tmp_path).read_bytes()
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="zip|Zip|truncated|File format|not a valid") as err:
        keras.saving.load_model(path)
    assert not isinstance(err.value, (SystemError, MemoryError))


# Config keys that older files may lack, per class; each has a default.
NEW_KEYS = {
    "LinearMultiHeadAttention": ["chunk_size", "eps", "use_gate", "feature_map"],
    "LinearTransformerDecoder": ["attention", "feature_map", "key_dim", "conv_size"],
    "CausalLinearAttention": ["recurrence", "output_norm", "conv_size"],
}


def _attention_model():
    keras.utils.set_random_seed(0)
    x = keras.Input((6, 8))
    return keras.Model(x, kla.LinearMultiHeadAttention(2, 4)(x, x, use_causal_mask=True))


@pytest.mark.parametrize("which", ["attention", "lm"])
def test_old_config_without_new_keys_loads_with_defaults(lm, which, tmp_path):
    """A `.keras` file whose configs predate keys added later (all with
    defaults) loads, and gives the same outputs."""
    model = lm if which == "lm" else _attention_model()
    path = _saved(model, tmp_path)
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                removed = _drop_keys(config)
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    assert removed >= 3  # the file really lost keys
    again = keras.saving.load_model(old)
    x = np.arange(12).reshape(2, 6) % 11 if which == "lm" else np.ones((2, 6, 8), "float32")
    np.testing.assert_allclose(again(x), model(x), rtol=1e-6)


def _drop_keys(node) -> int:
    removed = 0
    if isinstance(node, dict):
        for key in NEW_KEYS.get(node.get("class_name"), []):
            removed += node["config"].pop(key, None) is not None
        removed += sum(_drop_keys(v) for v in node.values())
    elif isinstance(node, list):
        removed += sum(_drop_keys(v) for v in node)
    return removed


@pytest.mark.parametrize("causal", [False, True])
def test_favor_with_overflowing_squared_norms_gives_zeros_not_nan(causal):
    """Entries ~1e20 overflow |x|² to inf, so every FAVOR exponent is -inf:
    φ is 0 and the output the documented fallback 0, never the NaN of the
    query stabiliser's -inf - (-inf)."""
    fm = kla.FavorFeatureMap(seed=0)
    x = np.full((1, 3, 2, 16), 1e20, "float32")
    for role in ("query", "key"):
        np.testing.assert_array_equal(kla.feature_maps.apply(fm, x, role), 0.0)
    layer = kla.LinearMultiHeadAttention(2, 8, feature_map="favor")
    query, value = np.full((1, 4, 8), 1e20, "float32"), np.ones((1, 4, 8), "float32")
    assert np.all(np.isfinite(layer(query, value, use_causal_mask=causal)))
