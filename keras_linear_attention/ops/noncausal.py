"""Non-causal (bidirectional) linear attention in O(T + S)."""

from __future__ import annotations

from typing import Any

from keras import ops

from keras_linear_attention.ops import _common


def linear_attention(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    key_mask: Any = None,
    eps: float = _common.DEFAULT_EPS,
) -> Any:
    """Kernel attention `φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps)` over all keys.

    `S = Σ_j φ(k_j) v_jᵀ` and `z = Σ_j φ(k_j)` are summed in float32 (float64
    for float64 inputs) whatever the input dtype; the result has `value`'s
    dtype.

    Args:
        phi_q: Feature-mapped queries, shape `(B, T, H, D)`.
        phi_k: Feature-mapped keys, shape `(B, S, H, D)`.
        value: Values, shape `(B, S, H, M)`.
        key_mask: Optional `(B, S)` mask, truthy for keys to keep.
        eps: Added to the denominator.

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
    out_dtype = value.dtype
    factor = _common.nonempty_factor(phi_k, "phi_k")
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    phi_q, phi_k, value = _common.cast_all(acc, phi_q, phi_k, value)
    phi_k, value = _common.mask_keys(phi_k, value, key_mask)
    # Heads first, so every contraction is a plain batched matmul whose
    # backward needs no transposes either.
    q, k, v = (ops.transpose(t, (0, 2, 1, 3)) for t in (phi_q, phi_k, value))
    kv = ops.matmul(ops.swapaxes(k, 2, 3), v)
    k_sum = ops.sum(k, axis=2, keepdims=True)
    numerator = ops.matmul(q, kv)
    denominator = ops.matmul(q, ops.swapaxes(k_sum, 2, 3))
    out = ops.transpose(_common.normalize(numerator, denominator, eps), (0, 2, 1, 3))
    return ops.cast(_common.guard(out, factor), out_dtype)
