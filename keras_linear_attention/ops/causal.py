"""Causal linear attention, computed chunk by chunk.

Within a chunk of C tokens the masked C×C kernel product is used; across
chunks only the per-chunk states `φ(K_c)ᵀ V_c` are prefix-summed. Memory is
O(N·C + (N/C)·D·M): no (N, D, M) per-token state tensor is ever built, in the
forward pass or in the hand-written backward pass (`_chunked.py`).

This module checks arguments and lays tensors out in chunks; the math and its
gradient live in `_chunked.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention.ops import _chunked, _common, scores

DEFAULT_CHUNK_SIZE = 64
# Sequences of at most this many tokens take the explicit masked N×N path
# (`scores.quadratic_attention`), longer ones the chunked algorithm. Chosen
# by measurement (benchmarks/training_shapes.py: B = 32, 4 heads of 64,
# model dim 256, forward+backward, TF graph and XLA on CPU).
DEFAULT_SHORT_SEQUENCE_THRESHOLD = 256


def causal_linear_attention(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    key_mask: Any = None,
    initial_state: tuple | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eps: float = _common.DEFAULT_EPS,
    return_state: bool = False,
    short_sequence_threshold: int | None = None,
) -> Any:
    """Causal linear attention: position i attends to keys j ≤ i.

    `out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps)` with `S_i = S_0 + Σ_{j≤i}
    φ(k_j) v_jᵀ` and `z_i = z_0 + Σ_{j≤i} φ(k_j)`, where `(S_0, z_0)` is the
    optional `initial_state` (e.g. from a prompt). States are accumulated in
    float32 (float64 for float64 inputs).

    Args:
        phi_q: Feature-mapped queries, shape `(B, N, H, D)`.
        phi_k: Feature-mapped keys, shape `(B, N, H, D)`.
        value: Values, shape `(B, N, H, M)`.
        key_mask: Optional `(B, N)` mask, truthy for keys to keep; masked
            keys add nothing to the state.
        initial_state: Optional `(kv, k_sum)` of shapes `(B, H, D, M)` and
            `(B, H, D)`.
        chunk_size: Tokens per chunk (a speed knob; results do not depend
            on it beyond float rounding).
        eps: Added to the denominator.
        return_state: If True, also return the final `(kv, k_sum)` state.
        short_sequence_threshold: Sequences of at most this many tokens
            are computed through the explicit masked N×N kernel matrix
            (the same result to float rounding, fewer and larger ops),
            longer ones chunkwise. None: `DEFAULT_SHORT_SEQUENCE_THRESHOLD`
            (256, measured); 0: always chunkwise. A length known only at
            run time is compared at run time (a `cond`).

    Returns:
        `(B, N, H, M)` tensor in `value`'s dtype, and the final state if
        `return_state`.

    Example:

    >>> import numpy as np
    >>> q = k = np.random.rand(1, 100, 2, 8).astype("float32")
    >>> v = np.random.rand(1, 100, 2, 4).astype("float32")
    >>> out, (kv, k_sum) = causal_linear_attention(q, k, v, return_state=True)
    >>> out.shape, kv.shape, k_sum.shape
    (TensorShape([1, 100, 2, 4]), TensorShape([1, 2, 8, 4]), TensorShape([1, 2, 8]))
    """
    return _checked_causal_attention(
        phi_q,
        phi_k,
        value,
        None,
        key_mask,
        initial_state,
        chunk_size,
        eps,
        return_state,
        short_sequence_threshold,
    )


def causal_attention_of_projections(
    query: Any,
    key: Any,
    value: Any,
    feature_map: Callable,
    key_mask: Any = None,
    initial_state: tuple | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eps: float = _common.DEFAULT_EPS,
    return_state: bool = False,
    short_sequence_threshold: int | None = None,
) -> Any:
    """`causal_linear_attention(φ(query), φ(key), value, ...)`, with φ applied
    to the chunked tensors (short sequences: to the heads-first ones).

    For a φ that acts on the last axis alone (the built-in maps). The
    tensors φ keeps for its gradient are then the chunks the attention
    needs, not a second, unchunked copy: the attention layers use this.
    """
    return _checked_causal_attention(
        query,
        key,
        value,
        feature_map,
        key_mask,
        initial_state,
        chunk_size,
        eps,
        return_state,
        short_sequence_threshold,
    )


def _checked_causal_attention(
    q, k, value, feature_map, key_mask, initial_state, chunk_size, eps, return_state, threshold
):
    """Checks, then the short (quadratic) path or the chunked algorithm; φ
    (if given) applied to the tensors in the layout the path uses."""
    q, k, value = (ops.convert_to_tensor(t) for t in (q, k, value))
    names = ("phi_q", "phi_k", "value") if feature_map is None else ("query", "key", "value")
    _common.check_qkv(q, k, value, names=names)
    _checks.check_dim(f"{names[0]} length", q.shape[1], f"{names[1]} length", k.shape[1])
    _checks.check_positive_int("chunk_size", chunk_size)
    scores.check_threshold(threshold)
    validity = _common.nonempty_validity(k, names[1])
    if key_mask is not None:
        _common.check_key_mask(key_mask, q.shape[1], names[1])
    args = (q, k, value, feature_map, key_mask, initial_state, eps, return_state)
    short = scores.use_quadratic(threshold, DEFAULT_SHORT_SEQUENCE_THRESHOLD, scores.length(q))
    if short is True:
        result = _quadratic(*args)
    elif short is False:
        result = _chunked_path(*args, chunk_size)
    else:
        result = ops.cond(
            short, lambda: _quadratic(*args), lambda: _chunked_path(*args, chunk_size)
        )
    out, state = result if return_state else (result, None)
    out = _common.poison_on_failure(out, validity)
    return (out, state) if return_state else out


def _quadratic(q, k, value, feature_map, key_mask, initial_state, eps, return_state):
    """The short path: the explicit masked N×N matrix, heads first."""
    q, k, v = (ops.transpose(t, (0, 2, 1, 3)) for t in (q, k, value))
    if feature_map is not None:
        q, k = fm_lib.apply(feature_map, q, "query"), fm_lib.apply(feature_map, k, "key")
    acc = _common.accumulation_dtype(q, k, v)
    q, k, v = _common.cast_all(acc, q, k, v)
    if key_mask is not None:
        keep = ops.reshape(ops.cast(key_mask, "bool"), (ops.shape(q)[0], 1, -1, 1))
        k, v = ops.where(keep, k, 0), ops.where(keep, v, 0)
    dims = (ops.shape(q)[0], q.shape[1], k.shape[3], v.shape[3])
    state = check_state(initial_state, dims, acc)
    state = None if state[0] is None else state
    out, kv, k_sum = scores.quadratic_attention(q, k, v, True, eps, state, return_state)
    out = ops.cast(out, value.dtype)
    return (out, (kv, k_sum)) if return_state else out


def _chunked_path(q, k, value, feature_map, key_mask, initial_state, eps, return_state, chunk_size):
    """The chunked algorithm; φ (if given) applied to the chunks."""
    length = q.shape[1]
    chunk = _chunked.chunk_for(chunk_size, q)
    shape = (ops.shape(q)[0], ops.shape(q)[1], q.shape[2])
    q, k, v = (_chunked.to_chunks(t, chunk) for t in (q, k, value))
    if feature_map is not None:
        q, k = fm_lib.apply(feature_map, q, "query"), fm_lib.apply(feature_map, k, "key")
    acc = _common.accumulation_dtype(q, k, v)
    q, k, v = _common.cast_all(acc, q, k, v)
    pads = feature_map is not None and (length is None or length % chunk != 0)
    k, v = _mask_chunked_keys(k, v, key_mask, shape, chunk, pads)
    dims = (shape[0], shape[2], k.shape[2], v.shape[2])
    initial_kv, initial_k_sum = check_state(initial_state, dims, acc)
    out, kv, k_sum = _chunked.chunked_causal_attention(
        q, k, v, initial_kv, initial_k_sum, shape, eps
    )
    out = ops.cast(out, value.dtype)
    return (out, (kv, k_sum)) if return_state else out


def _mask_chunked_keys(k, v, key_mask, shape, chunk, pads):
    """Remove padded keys from the chunked keys and values.

    Chunking pads N to a multiple of C with zeros, which add nothing when φ
    came first; φ applied to the chunks maps them to φ(0) (1 for elu+1), so
    then (`pads`) the chunk padding is masked like any padded key.
    """
    batch, length, heads = shape
    if key_mask is None and not pads:
        return k, v
    keep = ops.ones((batch, length), "bool") if key_mask is None else key_mask
    keep = ops.broadcast_to(
        ops.reshape(ops.cast(keep, "bool"), (batch, length, 1, 1)), (batch, length, heads, 1)
    )
    keep = ops.cast(_chunked.to_chunks(ops.cast(keep, k.dtype), chunk), "bool")
    return ops.where(keep, k, 0), ops.where(keep, v, 0)


def check_state(state: tuple | None, dims: tuple, acc: str) -> tuple:
    """Validate an `(kv, k_sum)` state against `dims = (batch, heads,
    feature_dim, value_dim)` of the keys and values it continues.

    A dim may be an int or, where the inputs' shape is known only at run
    time (a `tf.function` over any batch, the exported `step`), a scalar
    tensor: that comparison then runs in the graph, with the same message.
    """
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(
            "`initial_state` must be a pair `(kv, k_sum)` of shapes "
            f"(batch, heads, feature_dim, value_dim) and (batch, heads, "
            f"feature_dim); received {type(state).__name__}."
        )
    checked = []
    for name, s, expected in (
        ("initial_state[0] (kv)", state[0], tuple(dims)),
        ("initial_state[1] (k_sum)", state[1], tuple(dims[:3])),
    ):
        s = ops.convert_to_tensor(s)
        _checks.check_float(name, s)
        checked.append(ops.cast(_common.check_state_shape(name, s, expected), acc))
    return tuple(checked)
