"""Causal linear attention, computed chunk by chunk.

Within a chunk of C tokens the masked C×C kernel product is used; across
chunks only the per-chunk states `φ(K_c)ᵀ V_c` are prefix-summed. Memory is
O(N·C + (N/C)·D·M): no (N, D, M) per-token state tensor is ever built, in
the forward pass or (through autodiff of these ops) in the backward pass.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.ops import _common

DEFAULT_CHUNK_SIZE = 64


def _to_chunks(x: Any, chunk: int) -> Any:
    """(B, N, H, F) -> (B, N/C, C, H, F), zero-padding N up to a multiple."""
    n = ops.shape(x)[1]
    x = ops.pad(x, [[0, 0], [0, (-n) % chunk], [0, 0], [0, 0]])
    return ops.reshape(x, (ops.shape(x)[0], -1, chunk, x.shape[2], x.shape[3]))


def _exclusive_cumsum(x: Any) -> Any:
    """Sum over chunks strictly before each chunk (axis 1), exactly."""
    shifted = ops.concatenate([ops.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    return ops.cumsum(shifted, axis=1)


def causal_linear_attention(
    phi_q: Any,
    phi_k: Any,
    value: Any,
    key_mask: Any = None,
    initial_state: tuple | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eps: float = _common.DEFAULT_EPS,
    return_state: bool = False,
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
    phi_q, phi_k, value = (ops.convert_to_tensor(t) for t in (phi_q, phi_k, value))
    _common.check_qkv(phi_q, phi_k, value)
    _checks.check_dim("phi_q length", phi_q.shape[1], "phi_k length", phi_k.shape[1])
    _checks.check_positive_int("chunk_size", chunk_size)
    out_dtype = value.dtype
    factor = _common.nonempty_factor(phi_k, "phi_k")
    acc = _common.accumulation_dtype(phi_q, phi_k, value)
    phi_q, phi_k, value = _common.cast_all(acc, phi_q, phi_k, value)
    phi_k = _common.mask_keys(phi_k, key_mask)
    kv0, k_sum0 = check_state(initial_state, phi_k, value, acc)

    length = phi_q.shape[1]
    chunk = min(chunk_size, length) if length is not None else chunk_size
    q, k, v = (_to_chunks(t, chunk) for t in (phi_q, phi_k, value))

    # Inside each chunk: the masked C×C kernel matrix.
    scores = ops.einsum("bnchd,bnshd->bnhcs", q, k)
    scores = scores * ops.cast(ops.tril(ops.ones((chunk, chunk))), acc)
    numerator = ops.einsum("bnhcs,bnshm->bnchm", scores, v)
    denominator = ops.transpose(ops.sum(scores, axis=-1), (0, 1, 3, 2))

    # Across chunks: states of all earlier chunks, plus the initial state.
    kv_chunk = ops.einsum("bnshd,bnshm->bnhdm", k, v)
    k_sum_chunk = ops.sum(k, axis=2)
    kv_prefix = _exclusive_cumsum(kv_chunk)
    k_sum_prefix = _exclusive_cumsum(k_sum_chunk)
    if kv0 is not None:
        kv_prefix = kv_prefix + ops.expand_dims(kv0, 1)
        k_sum_prefix = k_sum_prefix + ops.expand_dims(k_sum0, 1)
    numerator = numerator + ops.einsum("bnchd,bnhdm->bnchm", q, kv_prefix)
    # A product and sum, not an einsum: TFLite has no builtin for this contraction.
    denominator = denominator + ops.sum(q * ops.expand_dims(k_sum_prefix, 2), axis=-1)

    out = _common.guard(numerator / (ops.expand_dims(denominator, -1) + eps), factor)
    out = ops.reshape(out, (ops.shape(out)[0], -1, out.shape[3], out.shape[4]))
    out = ops.cast(out[:, : ops.shape(phi_q)[1]], out_dtype)
    if not return_state:
        return out
    state = (kv_prefix[:, -1] + kv_chunk[:, -1], k_sum_prefix[:, -1] + k_sum_chunk[:, -1])
    return out, state


def check_state(state: tuple | None, phi_k: Any, value: Any, acc: str) -> tuple:
    """Validate an `(kv, k_sum)` state against the keys and values."""
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(
            "`initial_state` must be a pair `(kv, k_sum)` of shapes "
            f"(batch, heads, feature_dim, value_dim) and (batch, heads, "
            f"feature_dim); received {type(state).__name__}."
        )
    kv, k_sum = (ops.convert_to_tensor(s) for s in state)
    heads, feat, vdim = phi_k.shape[2], phi_k.shape[3], value.shape[3]
    expected_kv = (phi_k.shape[0], heads, feat, vdim)
    expected_sum = (phi_k.shape[0], heads, feat)
    for name, s, expected in (
        ("initial_state[0] (kv)", kv, expected_kv),
        ("initial_state[1] (k_sum)", k_sum, expected_sum),
    ):
        _checks.check_float(name, s)
        ok = len(s.shape) == len(expected) and all(
            a is None or b is None or a == b for a, b in zip(s.shape, expected, strict=True)
        )
        if not ok:
            raise ValueError(
                f"`{name}` must have shape {expected} (batch, heads, "
                f"feature_dim{', value_dim' if len(expected) == 4 else ''}); "
                f"received {tuple(s.shape)}."
            )
    return ops.cast(kv, acc), ops.cast(k_sum, acc)
