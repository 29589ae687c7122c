"""Rotary position embeddings (RoPE) for linear attention (RoFormer, eq. 19).

    out_i = Σ_j (R_i φ(q_i))ᵀ (R_j φ(k_j)) v_j / (Σ_j φ(q_i)ᵀ φ(k_j) + eps)

`R_p` rotates the feature pairs `(x_m, x_{m+F/2})` by `p·θ_m`, `θ_m =
max_wavelength^(−2m/F)` (keras-hub's `RotaryEmbedding` layout, rotate-half
as in LLaMA). Only the numerator is rotated: the normaliser keeps the
positive kernel `φ(q)ᵀφ(k)`, which a rotation would make signed. The causal
state is the usual `(kv, k_sum)`, `kv` summing rotated keys and `k_sum`
unrotated ones, so only the absolute position of a call's first token
(`start_index`) is needed to continue a sequence.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.ops import _chunked, _common
from keras_linear_attention.ops.causal import DEFAULT_CHUNK_SIZE, check_state
from keras_linear_attention.ops.recurrences import gated_linear_attention

DEFAULT_MAX_WAVELENGTH = 10000.0


def rotate(x: Any, start_index: Any = 0, max_wavelength: float = DEFAULT_MAX_WAVELENGTH) -> Any:
    """`x·cos + rotate_half(x)·sin` at positions `start_index + arange(T)`.

    Args:
        x: `(B, T, H, F)`, F even.
        start_index: Position of `x[:, 0]`: an int or a scalar tensor.
        max_wavelength: The longest wavelength, `2π / θ_{F/2−1}` roughly.

    Returns:
        The rotated `x`, in its dtype (angles are computed in float32, or
        float64 for float64 inputs).

    Example:

    >>> import numpy as np
    >>> x = np.ones((1, 3, 1, 2), "float32")
    >>> np.round(np.asarray(rotate(x))[0, :, 0], 3)  # angle p·1 on pair (x_0, x_1)
    array([[ 1.   ,  1.   ],
           [-0.301,  1.382],
           [-1.325,  0.493]], dtype=float32)
    """
    x = ops.convert_to_tensor(x)
    _checks.check_float("x", x)
    _checks.check_rank("x", x, 4, "(batch, length, heads, feature_dim)")
    check_max_wavelength(max_wavelength)
    check_even_features(x.shape[-1], "x")
    acc = _common.accumulation_dtype(x)
    return ops.cast(_rotate(ops.cast(x, acc), start_index, max_wavelength), x.dtype)


def _rotate(x: Any, start_index: Any, max_wavelength: float) -> Any:
    """`rotate` of an `x` already in the accumulation dtype."""
    half = x.shape[-1] // 2
    inverse_freq = ops.power(
        ops.cast(max_wavelength, x.dtype), -ops.arange(half, dtype=x.dtype) / half
    )
    positions = ops.cast(start_index, x.dtype) + ops.arange(ops.shape(x)[1], dtype=x.dtype)
    angles = ops.expand_dims(positions, 1) * inverse_freq  # (T, F/2)
    angles = ops.expand_dims(ops.concatenate([angles, angles], axis=-1), (0, 2))
    x1, x2 = x[..., :half], x[..., half:]
    return x * ops.cos(angles) + ops.concatenate([-x2, x1], axis=-1) * ops.sin(angles)


def rotary_linear_attention(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    key_mask: Any = None,
    eps: float = _common.DEFAULT_EPS,
    max_wavelength: float = DEFAULT_MAX_WAVELENGTH,
) -> Any:
    """Non-causal linear attention with RoPE in the numerator; O(T + S).

    Queries sit at positions 0..T−1, keys at 0..S−1 (only j − i matters).
    `out_i = Rφq_i · Σ_j (Rφk_j) v_jᵀ / (φq_i · Σ_j φk_j + eps)`, the sums
    in float32 (float64 for float64 inputs).

    Args:
        phi_q: `(B, T, H, F)` feature-mapped queries, F even.
        phi_k: `(B, S, H, F)` feature-mapped keys.
        value: `(B, S, H, M)` values.
        key_mask: Optional `(B, S)`, truthy for keys to keep.
        eps: Added to the denominator.
        max_wavelength: See `rotate`.

    Returns:
        `(B, T, H, M)` in `value`'s dtype.

    Example:

    >>> import numpy as np
    >>> q = k = np.ones((1, 4, 2, 8), "float32")
    >>> v = np.ones((1, 4, 2, 3), "float32")
    >>> rotary_linear_attention(q, k, v).shape
    TensorShape([1, 4, 2, 3])
    """
    phi_q, phi_k, value = (ops.convert_to_tensor(t) for t in (phi_q, phi_k, value))
    _check_args(phi_q, phi_k, value, max_wavelength)
    validity = _common.nonempty_validity(phi_k, "phi_k")
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    q, k, v = _common.cast_all(acc, phi_q, phi_k, value)
    k, v = _common.mask_keys(k, v, key_mask)
    kv = ops.einsum("bshf,bshm->bhfm", _rotate(k, 0, max_wavelength), v)
    numerator = ops.einsum("bthf,bhfm->bthm", _rotate(q, 0, max_wavelength), kv)
    denominator = ops.einsum("bthf,bhf->bth", q, ops.sum(k, axis=1))
    out = _common.normalize(numerator, ops.expand_dims(denominator, -1), eps)
    return ops.cast(_common.poison_on_failure(out, validity), value.dtype)


def rotary_causal_linear_attention(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    start_index: Any = 0,
    key_mask: Any = None,
    initial_state: tuple | None = None,
    return_state: bool = False,
    eps: float = _common.DEFAULT_EPS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_wavelength: float = DEFAULT_MAX_WAVELENGTH,
) -> Any:
    """Causal linear attention with RoPE in the numerator; O(N), chunked.

    `out_i = Rφq_i · kv_i / (φq_i · k_sum_i + eps)` with `kv_i = kv_0 +
    Σ_{j≤i} (Rφk_j) v_jᵀ` and `k_sum_i = k_sum_0 + Σ_{j≤i} φk_j`, token i at
    position `start_index + i`. The numerator is `gated_linear_attention`
    with no decay (chunked, memory-lean gradients).

    Args:
        phi_q, phi_k: `(B, N, H, F)` feature-mapped queries and keys, F even.
        value: `(B, N, H, M)` values.
        start_index: Absolute position of the first token (an int or a
            scalar tensor): the length of what `initial_state` summed.
        key_mask: Optional `(B, N)`; masked keys add nothing to the state.
        initial_state: Optional `(kv, k_sum)`, `(B, H, F, M)` and `(B, H, F)`.
        return_state: Also return the final `(kv, k_sum)`.
        eps: Added to the denominator.
        chunk_size: Tokens per chunk (speed only).
        max_wavelength: See `rotate`.

    Returns:
        `(B, N, H, M)` in `value`'s dtype, and the final state (float32, or
        float64 for float64 inputs) with `return_state`.

    Example:

    >>> import numpy as np
    >>> q = k = np.ones((1, 6, 2, 8), "float32")
    >>> v = np.ones((1, 6, 2, 3), "float32")
    >>> out, (kv, k_sum) = rotary_causal_linear_attention(q, k, v, return_state=True)
    >>> out.shape, kv.shape, k_sum.shape
    (TensorShape([1, 6, 2, 3]), TensorShape([1, 2, 8, 3]), TensorShape([1, 2, 8]))
    """
    phi_q, phi_k, value = (ops.convert_to_tensor(t) for t in (phi_q, phi_k, value))
    _check_args(phi_q, phi_k, value, max_wavelength)
    _checks.check_dim("phi_q length", phi_q.shape[1], "phi_k length", phi_k.shape[1])
    _checks.check_positive_int("chunk_size", chunk_size)
    validity = _common.nonempty_validity(phi_k, "phi_k")
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    q, k, v = _common.cast_all(acc, phi_q, phi_k, value)
    k, v = _common.mask_keys(k, v, key_mask)
    batch, heads, feat = ops.shape(q)[0], q.shape[2], q.shape[3]
    kv0, k_sum0 = check_state(initial_state, (batch, heads, feat, v.shape[3]), acc)
    rq, rk = (_rotate(x, start_index, max_wavelength) for x in (q, k))
    no_decay = ops.zeros_like(q[..., 0])
    numerator, kv = gated_linear_attention(
        rq, rk, v, no_decay, initial_state=kv0, return_state=True, chunk_size=chunk_size
    )
    k_sums, k_sum = _inclusive_key_sums(k, k_sum0)
    denominator = ops.sum(q * k_sums, axis=-1, keepdims=True)
    out = _common.normalize(numerator, denominator, eps)
    out = ops.cast(_common.poison_on_failure(out, validity), value.dtype)
    return (out, (kv, k_sum)) if return_state else out


def _inclusive_key_sums(k: Any, k_sum0: Any) -> tuple:
    """`k_sum0 + Σ_{j≤i} k_j` per position `(B, N, H, F)`, and the total.

    Through `_chunked`'s blocked prefix sum: TF's and XLA's `cumsum` are slow
    along a long axis (see `_chunked.PREFIX_BLOCK`).
    """
    batch, heads, feat = ops.shape(k)[0], k.shape[2], k.shape[3]
    flat = ops.reshape(k, (batch, -1, heads * feat))
    initial = None if k_sum0 is None else ops.reshape(k_sum0, (batch, heads * feat))
    inclusive = _chunked.exclusive_prefix_sum(flat, initial) + flat
    total = ops.sum(k, axis=1) if k_sum0 is None else k_sum0 + ops.sum(k, axis=1)
    return ops.reshape(inclusive, ops.shape(k)), total


def rotary_linear_attention_step(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    state: tuple,
    index: Any,
    eps: float = _common.DEFAULT_EPS,
    max_wavelength: float = DEFAULT_MAX_WAVELENGTH,
) -> tuple:
    """One token of `rotary_causal_linear_attention`, at position `index`.

    Args:
        phi_q, phi_k: `(B, H, F)` feature-mapped query and key, F even.
        value: `(B, H, M)`.
        state: `(kv, k_sum)` of the earlier tokens, `(B, H, F, M)`, `(B, H, F)`.
        index: The token's absolute position (an int or a scalar tensor).
        eps: Added to the denominator.
        max_wavelength: See `rotate`.

    Returns:
        `(out, new_state)`, `out` `(B, H, M)` in `value`'s dtype.

    Example:

    >>> import numpy as np
    >>> from keras_linear_attention.ops import zero_state
    >>> q = k = np.ones((2, 4, 8), "float32")
    >>> v = np.ones((2, 4, 3), "float32")
    >>> out, state = rotary_linear_attention_step(q, k, v, zero_state(2, 4, 8, 3), index=0)
    >>> out.shape
    TensorShape([2, 4, 3])
    """
    phi_q, phi_k, value = (ops.convert_to_tensor(t) for t in (phi_q, phi_k, value))
    _common.check_step_inputs(("phi_q", phi_q), ("phi_k", phi_k), ("value", value))
    check_max_wavelength(max_wavelength)
    check_even_features(phi_q.shape[-1], "phi_q")
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    q, k, v = _common.cast_all(acc, phi_q, phi_k, value)
    kv, k_sum = check_state(state, (ops.shape(k)[0], k.shape[1], k.shape[2], v.shape[2]), acc)
    rq, rk = (_rotate(ops.expand_dims(x, 1), index, max_wavelength)[:, 0] for x in (q, k))
    kv = kv + ops.einsum("bhf,bhm->bhfm", rk, v)
    k_sum = k_sum + k
    numerator = ops.einsum("bhf,bhfm->bhm", rq, kv)
    denominator = ops.sum(q * k_sum, axis=-1, keepdims=True)
    out = _common.normalize(numerator, denominator, eps)
    return ops.cast(out, value.dtype), (kv, k_sum)


def rotary_attention_scores(
    phi_q: Any,
    phi_k: Any,
    key_mask: Any = None,
    causal: bool = False,
    eps: float = _common.DEFAULT_EPS,
    max_wavelength: float = DEFAULT_MAX_WAVELENGTH,
) -> Any:
    """The `(B, H, T, S)` matrix `A` with `rotary_linear_attention = A @ V`
    (causal: top-left `tril`, as `rotary_causal_linear_attention` from 0).

    `A_ij = Rφq_i·Rφk_j / (Σ_j' φq_i·φk_j' + eps)` over unmasked keys: rows
    need not sum to 1, nor entries be positive. O(T·S): for inspection only.

    Example:

    >>> import numpy as np
    >>> q = k = np.ones((1, 4, 2, 8), "float32")
    >>> rotary_attention_scores(q, k, causal=True).shape
    TensorShape([1, 2, 4, 4])
    """
    phi_q, phi_k = ops.convert_to_tensor(phi_q), ops.convert_to_tensor(phi_k)
    check_max_wavelength(max_wavelength)
    check_even_features(phi_q.shape[-1], "phi_q")
    acc = _common.accumulation_dtype(phi_q, phi_k)
    q, k = _common.cast_all(acc, phi_q, phi_k)
    k, _ = _common.mask_keys(k, None, key_mask)
    rq, rk = (_rotate(x, 0, max_wavelength) for x in (q, k))
    numerator = ops.einsum("bthf,bshf->bhts", rq, rk)
    kernel = ops.einsum("bthf,bshf->bhts", q, k)
    if causal:
        keep = ops.cast(ops.tril(ops.ones(ops.shape(kernel)[2:])), acc)
        numerator, kernel = numerator * keep, kernel * keep
    denominator, _ = _common.safe_denominator(ops.sum(kernel, axis=-1, keepdims=True), eps)
    return numerator / denominator


def check_max_wavelength(value: Any, name: str = "max_wavelength") -> None:
    """A positive, finite real number (not a bool)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite float; received {value!r}.")


def check_even_features(feature_dim: Any, of: str, name: str = "max_wavelength") -> None:
    """RoPE rotates pairs of features: an odd feature dim has no layout."""
    if feature_dim is not None and feature_dim % 2:
        raise ValueError(
            f"`{name}` (rotary position embeddings) needs an even feature dim, "
            f"as it rotates pairs of features; {of} has odd feature dim {feature_dim}."
        )


def _check_args(phi_q: Any, phi_k: Any, value: Any, max_wavelength: Any) -> None:
    _common.check_qkv(phi_q, phi_k, value)
    check_max_wavelength(max_wavelength)
    check_even_features(phi_q.shape[-1], "phi_q")
