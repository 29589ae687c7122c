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
from reference import kernel_attention

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
        out = kla.causal_linear_attention(q, k, v, key_mask=mask, chunk_size=chunk)
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
    out = kla.causal_linear_attention(q, k, v, chunk_size=chunk).numpy()
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


# ---------------------------------------------------------------- clear errors
@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(0)
    return kla.build_causal_lm(11, max_length=16, hidden_dim=8, num_layers=2, num_heads=2)


@pytest.mark.parametrize(
    "states, pattern",
    [
        (
            lambda s: s[:3],
            r"`states` must hold 4 tensors \(kv, k_sum per block, 2 blocks\); received 3",
        ),
        (lambda s: (s[1], s[0], *s[2:]), r"`initial_state\[0\] \(kv\)` must have shape"),
        (lambda s: (s[0][:, :1], *s[1:]), r"`initial_state\[0\] \(kv\)` must have shape"),
        (lambda s: (tf.cast(s[0], tf.int32), *s[1:]), r"must be a floating-point tensor"),
    ],
)
def test_mismatched_states_to_the_recurrent_step(lm, states, pattern):
    runner = RecurrentLM(lm, jit_compile=False)
    good = runner.initial_state(2)
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
    "LinearTransformerDecoder": ["attention", "feature_map", "key_dim"],
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
