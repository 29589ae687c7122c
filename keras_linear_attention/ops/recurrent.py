"""Recurrent (RNN) form of causal linear attention.

The state `(kv, k_sum)` holds `kv = Σ φ(k_j) v_jᵀ` and `k_sum = Σ φ(k_j)` per
head (the paper's S and z);
one step costs O(D·M) whatever the context length.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.ops import _common
from keras_linear_attention.ops.causal import check_state


def zero_state(
    batch_size: Any, num_heads: int, feature_dim: int, value_dim: int, dtype: str = "float32"
) -> tuple:
    """Zero state `(kv, k_sum)`: shapes `(B, H, D, M)` and `(B, H, D)`."""
    return (
        ops.zeros((batch_size, num_heads, feature_dim, value_dim), dtype=dtype),
        ops.zeros((batch_size, num_heads, feature_dim), dtype=dtype),
    )


def linear_attention_step(
    phi_q: Any, phi_k: Any, value: Any, state: tuple, eps: float = _common.DEFAULT_EPS
) -> tuple:
    """One generation step: add token t to the state, then attend.

    Args:
        phi_q: `(B, H, D)` feature-mapped query of the new token.
        phi_k: `(B, H, D)` feature-mapped key of the new token.
        value: `(B, H, M)` value of the new token.
        state: `(kv, k_sum)` of shapes `(B, H, D, M)`, `(B, H, D)`.
        eps: Added to the denominator.

    Returns:
        `(out, new_state)` with `out` of shape `(B, H, M)` in `value`'s dtype.

    Example:

    >>> import numpy as np
    >>> state = zero_state(2, 4, 8, 16)
    >>> q = k = np.random.rand(2, 4, 8).astype("float32")
    >>> v = np.random.rand(2, 4, 16).astype("float32")
    >>> out, state = linear_attention_step(q, k, v, state)
    >>> out.shape
    TensorShape([2, 4, 16])
    """
    phi_q, phi_k, value = (ops.convert_to_tensor(t) for t in (phi_q, phi_k, value))
    _common.check_step_inputs(("phi_q", phi_q), ("phi_k", phi_k), ("value", value))
    out_dtype = value.dtype
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    phi_q, phi_k, value = _common.cast_all(acc, phi_q, phi_k, value)
    kv, k_sum = check_state(
        state, (ops.shape(phi_k)[0], phi_k.shape[1], phi_k.shape[2], value.shape[2]), acc
    )
    kv = kv + ops.einsum("bhd,bhm->bhdm", phi_k, value)
    k_sum = k_sum + phi_k
    numerator = ops.einsum("bhd,bhdm->bhm", phi_q, kv)
    denominator = ops.einsum("bhd,bhd->bh", phi_q, k_sum)
    out = _common.normalize(numerator, ops.expand_dims(denominator, -1), eps)
    return ops.cast(out, out_dtype), (kv, k_sum)


def recurrent_linear_attention(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    initial_state: tuple | None = None,
    key_mask: Any = None,
    eps: float = _common.DEFAULT_EPS,
) -> tuple:
    """Run the recurrence token by token over `(B, N, H, ·)` inputs.

    The same function as `causal_linear_attention`, written as an RNN
    (`keras.ops.scan`); O(N) sequential steps, so use it for checking and
    for short inputs, and the chunked form for long ones.

    Returns:
        `(out, final_state)`: `out` of shape `(B, N, H, M)`.
    """
    phi_q, phi_k, value = (ops.convert_to_tensor(t) for t in (phi_q, phi_k, value))
    _common.check_qkv(phi_q, phi_k, value)
    _checks.check_dim("phi_q length", phi_q.shape[1], "phi_k length", phi_k.shape[1])
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    phi_k, value = _common.mask_keys(ops.cast(phi_k, acc), value, key_mask)
    if initial_state is None:
        b, h, d, m = ops.shape(phi_k)[0], phi_k.shape[2], phi_k.shape[3], value.shape[3]
        initial_state = (ops.zeros((b, h, d, m), acc), ops.zeros((b, h, d), acc))
    state = check_state(
        initial_state, (ops.shape(phi_k)[0], phi_k.shape[2], phi_k.shape[3], value.shape[3]), acc
    )

    def step(carry, inputs):
        out, carry = linear_attention_step(*inputs, carry, eps=eps)
        return carry, out

    time_major = [ops.moveaxis(t, 1, 0) for t in (phi_q, phi_k, value)]
    state, outs = _scan(step, state, time_major)
    return ops.moveaxis(outs, 0, 1), state


def _scan(step, state, xs):
    """`keras.ops.scan`, except on TensorFlow, whose Keras `scan` requires the
    per-step output to have the carry's shape; there, a while loop. Each
    step's output has the shape and dtype of a step of the values, xs[2]."""
    if keras.backend.backend() != "tensorflow":
        return ops.scan(step, state, xs)
    import tensorflow as tf

    n = tf.shape(xs[0])[0]
    outs = tf.TensorArray(xs[2].dtype, size=n, element_shape=xs[2].shape[1:])

    def body(i, state, outs):
        state, out = step(state, [x[i] for x in xs])
        return i + 1, state, outs.write(i, out)

    _, state, outs = tf.while_loop(lambda i, *_: i < n, body, (0, state, outs))
    return state, outs.stack()
