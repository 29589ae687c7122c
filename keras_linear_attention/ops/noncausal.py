"""Non-causal (bidirectional) linear attention in O(T + S)."""

from __future__ import annotations

from typing import Any

from keras import ops

from keras_linear_attention.ops import _common, scores

# Queries and keys both at most this long take the explicit T×S path
# (`scores.quadratic_attention`); see `causal.DEFAULT_SHORT_SEQUENCE_THRESHOLD`.
DEFAULT_SHORT_SEQUENCE_THRESHOLD = 64


def linear_attention(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    key_mask: Any = None,
    eps: float = _common.DEFAULT_EPS,
    short_sequence_threshold: int | None = None,
) -> Any:
    """Kernel attention `φ(q_i)ᵀ kv / (φ(q_i)ᵀ k_sum + eps)` over all keys.

    `kv = Σ_j φ(k_j) v_jᵀ` and `k_sum = Σ_j φ(k_j)` are summed in float32 (float64
    for float64 inputs) whatever the input dtype; the result has `value`'s
    dtype.

    Args:
        phi_q: Feature-mapped queries, shape `(B, T, H, D)`.
        phi_k: Feature-mapped keys, shape `(B, S, H, D)`.
        value: Values, shape `(B, S, H, M)`.
        key_mask: Optional `(B, S)` mask, truthy for keys to keep.
        eps: Added to the denominator.
        short_sequence_threshold: When the query and key lengths are both
            at most this, compute through the explicit T×S kernel matrix
            (the same result to float rounding), else through the `(D, M)`
            sums. None: `DEFAULT_SHORT_SEQUENCE_THRESHOLD` (64, measured);
            0: never. Lengths known only at run time are compared at run
            time (a `cond`).

    Returns:
        Tensor of shape `(B, T, H, M)`.

    Example:

    >>> import numpy as np
    >>> q = np.random.rand(2, 5, 4, 8).astype("float32")
    >>> k = np.random.rand(2, 7, 4, 8).astype("float32")
    >>> v = np.random.rand(2, 7, 4, 16).astype("float32")
    >>> linear_attention(q, k, v).shape
    TensorShape([2, 5, 4, 16])
    """
    phi_q, phi_k, value = (ops.convert_to_tensor(t) for t in (phi_q, phi_k, value))
    _common.check_qkv(phi_q, phi_k, value)
    scores.check_threshold(short_sequence_threshold)
    out_dtype = value.dtype
    validity = _common.nonempty_validity(phi_k, "phi_k")
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    phi_q, phi_k, value = _common.cast_all(acc, phi_q, phi_k, value)
    phi_k, value = _common.mask_keys(phi_k, value, key_mask)
    short = scores.use_quadratic(
        short_sequence_threshold,
        DEFAULT_SHORT_SEQUENCE_THRESHOLD,
        scores.length(phi_q),
        scores.length(phi_k),
    )
    args = (phi_q, phi_k, value, eps)
    if short is True:
        out = _quadratic(*args)
    elif short is False:
        out = _global_attention(*args)
    else:
        out = ops.cond(short, lambda: _quadratic(*args), lambda: _global_attention(*args))
    return ops.cast(_common.poison_on_failure(out, validity), out_dtype)


def _quadratic(q: Any, k: Any, v: Any, eps: float) -> Any:
    """The short path: the explicit T×S matrix (`scores.quadratic_attention`)."""
    return scores.quadratic_attention(*(_heads_first(t) for t in (q, k, v)), False, eps)[0]


def _heads_first(x: Any) -> Any:
    return ops.transpose(x, (0, 2, 1, 3))


def _global_attention(q: Any, k: Any, v: Any, eps: float) -> Any:
    """`(B, T, H, D), (B, S, H, D), (B, S, H, M) -> (B, T, H, M)`, with a
    hand-written gradient: it reuses the forward pass's heads-first copies,
    the `(D, M)` state and the normaliser, and needs no broadcast division
    gradient or `(B, T, H, D)`-sized products besides its results."""
    swap = lambda x: ops.swapaxes(x, 2, 3)

    @ops.custom_gradient
    def attend(q, k, v):
        # Heads first, so every contraction is a plain batched matmul.
        qh, kh, vh = (_heads_first(t) for t in (q, k, v))
        kv = ops.matmul(swap(kh), vh)
        k_sum = ops.sum(kh, axis=2, keepdims=True)
        denominator, zero = _common.safe_denominator(ops.matmul(qh, swap(k_sum)), eps)
        out = _heads_first(ops.matmul(qh, kv) / denominator)

        def grad(*args, upstream=None):
            g_out = args[0] if upstream is None else upstream  # TF / JAX
            # `after`: starts once the output exists (see `_common.after`).
            g_out = _common.scheduled_after(g_out, out)
            g_den = _common.denominator_gradient(g_out, out, denominator, zero, _heads_first)
            g_num = _heads_first(g_out) / denominator
            g_kv = ops.matmul(swap(qh), g_num)
            g_k_sum = swap(ops.matmul(swap(qh), g_den))
            g_q = ops.matmul(g_num, swap(kv)) + g_den * k_sum
            g_k = ops.matmul(vh, swap(g_kv)) + g_k_sum
            g_v = ops.matmul(kh, g_kv)
            return tuple(_heads_first(g) for g in (g_q, g_k, g_v))

        return out, grad

    return attend(q, k, v)
