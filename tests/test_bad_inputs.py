"""Bad input gets an error naming the argument and what was expected."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_linear_attention as kla

F = np.ones((2, 5, 2, 4), "float32")
V = np.ones((2, 5, 2, 3), "float32")
X = np.ones((2, 5, 8), "float32")


def _lin(**kw):
    return kla.LinearMultiHeadAttention(num_heads=2, key_dim=4, **kw)


def _built_causal():
    layer = kla.CausalLinearAttention(num_heads=2, key_dim=4)
    layer(X)
    return layer


CASES = [
    # (description, callable, exception, message pattern)
    (
        "ops: rank-3 phi_q",
        lambda: kla.linear_attention(F[0], F, V),
        ValueError,
        r"`phi_q` must have rank 4",
    ),
    (
        "ops: integer value",
        lambda: kla.linear_attention(F, F, V.astype("int32")),
        TypeError,
        r"`value` must be a floating-point tensor; received dtype int32",
    ),
    (
        "ops: feature dims differ",
        lambda: kla.linear_attention(F, F[..., :3], V),
        ValueError,
        r"phi_q feature dim \(4\) must equal phi_k feature dim \(3\)",
    ),
    (
        "ops: key/value length differ",
        lambda: kla.linear_attention(F, F, V[:, :4]),
        ValueError,
        r"phi_k length \(5\) must equal value length \(4\)",
    ),
    (
        "ops: zero-length keys",
        lambda: kla.linear_attention(F, F[:, :0], V[:, :0]),
        ValueError,
        r"`phi_k` has sequence length 0",
    ),
    (
        "ops: causal T != S",
        lambda: kla.causal_linear_attention(F[:, :3], F, V),
        ValueError,
        r"phi_q length \(3\) must equal phi_k length \(5\)",
    ),
    (
        "ops: key_mask wrong shape",
        lambda: kla.linear_attention(F, F, V, key_mask=np.ones((2, 4))),
        ValueError,
        r"key_mask length \(4\) must equal phi_k length \(5\)",
    ),
    (
        "ops: chunk_size 0",
        lambda: kla.causal_linear_attention(F, F, V, chunk_size=0),
        ValueError,
        r"`chunk_size` must be a positive integer",
    ),
    (
        "ops: state not a pair",
        lambda: kla.causal_linear_attention(F, F, V, initial_state=V),
        ValueError,
        r"`initial_state` must be a pair",
    ),
    (
        "ops: state wrong shape",
        lambda: kla.causal_linear_attention(
            F, F, V, initial_state=(np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4)))
        ),
        ValueError,
        r"initial_state\[0\] \(kv\)` must have shape \(2, 2, 4, 3\)",
    ),
    ("layer: rank-2 query", lambda: _lin()(X[0], X[0]), ValueError, r"`query` must have rank >= 3"),
    (
        "layer: integer query",
        lambda: _lin()(X.astype("int32"), X),
        TypeError,
        r"`query` must be a floating-point tensor",
    ),
    (
        "layer: zero-length value",
        lambda: _lin()(X, X[:, :0]),
        ValueError,
        r"`value` has sequence length 0",
    ),
    (
        "layer: key/value positions differ",
        lambda: _lin()(X, X, key=X[:, :3]),
        ValueError,
        r"All dimensions of `value` and `key`, except the last one, must be equal",
    ),
    (
        "built layer: key/value positions differ",
        lambda: [b := _lin(), b(X, X), b(X, X, key=X[:, :3])],
        ValueError,
        r"All dimensions of `value` and `key`, except the last one, must be equal",
    ),
    (
        "layer: feature dim changed after build",
        lambda: [_lin_built := _lin(), _lin_built(X, X), _lin_built(X[..., :5], X)],
        ValueError,
        r"`query` feature dim \(5\) must equal the size it was built with \(8\)",
    ),
    (
        "layer: value_mask wrong shape",
        lambda: _lin()(X, X, value_mask=np.ones((2, 4))),
        ValueError,
        r"`value_mask` must have shape \(2, 5\)",
    ),
    (
        "layer: attention_mask rank 5",
        lambda: _lin()(X, X, attention_mask=np.ones((2, 1, 1, 5, 5))),
        ValueError,
        r"key-padding and causal masking only",
    ),
    (
        "layer: attention_mask heads differ",
        lambda: _lin()(
            X, X, attention_mask=np.stack([np.ones((2, 5, 5)), np.tile(np.eye(5), (2, 1, 1))], 1)
        ),
        ValueError,
        r"its heads differ",
    ),
    (
        "layer: attention_mask (B', S) read as (T, S), T differs",
        lambda: _lin()(X[:1], X[:1], attention_mask=np.ones((3, 5))),
        ValueError,
        r"attention_mask of shape \(3, 5\)",
    ),
    (
        "layer: attention_mask batch 3 for batch 2",
        lambda: _lin()(X, X, attention_mask=np.ones((3, 1, 5))),
        ValueError,
        r"3 along its batch axis, for 2 batch: expected 1 or 2",
    ),
    (
        "layer: attention_mask heads 3 for 2 heads",
        lambda: _lin()(X, X, attention_mask=np.ones((2, 3, 5, 5))),
        ValueError,
        r"3 along its heads axis, for 2 heads",
    ),
    (
        "layer: attention_mask wrong S",
        lambda: _lin()(X, X, attention_mask=np.ones((2, 5, 4))),
        ValueError,
        r"key-padding and causal masking only",
    ),
    ("layer: sliding_window", lambda: _lin(sliding_window=4), ValueError, r"`sliding_window`"),
    (
        "layer: flash_attention",
        lambda: _lin(flash_attention=True),
        ValueError,
        r"`flash_attention`",
    ),
    ("layer: dropout 1.0", lambda: _lin(dropout=1.0), ValueError, r"`dropout` must be"),
    ("layer: negative eps", lambda: _lin(eps=-1.0), ValueError, r"`eps` must be"),
    ("layer: chunk_size 0", lambda: _lin(chunk_size=0), ValueError, r"`chunk_size` must be"),
    (
        "layer: unknown feature map",
        lambda: _lin(feature_map="softmax"),
        ValueError,
        r"Unknown `feature_map` 'softmax'",
    ),
    ("layer: num_heads 0", lambda: kla.LinearMultiHeadAttention(0, 4), ValueError, r"`num_heads`"),
    (
        "causal: rank-4 inputs",
        lambda: kla.CausalLinearAttention(2, 4)(np.ones((1, 2, 3, 8))),
        ValueError,
        r"`inputs` must have shape \(batch, length, features\)",
    ),
    (
        "causal: padding_mask wrong shape",
        lambda: kla.CausalLinearAttention(2, 4)(X, padding_mask=np.ones((2, 6))),
        ValueError,
        r"`padding_mask` must have shape \(2, 5\)",
    ),
    (
        "causal: state of wrong batch",
        lambda: (c := _built_causal())(X, initial_state=c.get_initial_state(3)),
        ValueError,
        r"initial_state\[0\] \(kv\)` must have shape \(2, 2, 4, 4\)",
    ),
    (
        "causal: integer state",
        lambda: (c := _built_causal())(
            X, initial_state=tuple(tf.cast(s, tf.int32) for s in c.get_initial_state(2))
        ),
        TypeError,
        r"`initial_state\[0\] \(kv\)` must be a floating-point tensor",
    ),
]


@pytest.mark.parametrize("desc,fn,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(desc, fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_zero_length_under_tf_function_is_not_silent():
    """With unknown static length, an empty key sequence still fails loudly."""
    layer = _lin()
    layer(X, X)
    fn = tf.function(lambda q, v: layer(q, v), input_signature=[tf.TensorSpec((None, None, 8))] * 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="sequence length 0"):
        fn(X, X[:, :0])


def test_errors_are_raised_before_tensorflow_sees_the_input():
    """The message names our argument, not a TF op."""
    with pytest.raises(ValueError) as info:
        _lin()(X, X, value_mask=np.ones((2, 4)))
    assert "value_mask" in str(info.value)
    assert "Incompatible shapes" not in str(info.value)
    keras.backend.clear_session()
