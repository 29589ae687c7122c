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


# Chunk states are prefix-summed in blocks of this many chunks with one small
# triangular matmul each; only the block totals go through `ops.cumsum`. TF's
# cumsum streams slowly on CPU and XLA's grows superlinearly with the scanned
# length (NOTES.md section 2), so the scanned axis stays N / (C * 16) long.
PREFIX_BLOCK = 16


def _heads_first_chunks(x: Any, chunk: int) -> Any:
    """(B, N, H, F) -> (B*H*n, C, F): zero-pad N to n*C, group by head.

    Batched matmuls over these rank-3 tensors need no further transposes,
    forward or backward (TFLite's BATCH_MATMUL also takes them as is).
    """
    n = ops.shape(x)[1]
    x = ops.pad(x, [[0, 0], [0, (-n) % chunk], [0, 0], [0, 0]])
    x = ops.reshape(x, (ops.shape(x)[0], -1, chunk, x.shape[2], x.shape[3]))
    return ops.reshape(ops.transpose(x, (0, 3, 1, 2, 4)), (-1, chunk, x.shape[4]))


def _strict_tril(size: int, dtype: str) -> Any:
    return ops.cast(ops.tril(ops.ones((size, size)), -1), dtype)


def exclusive_prefix_sum(x: Any) -> Any:
    """Sum of `x[:, j]` over j < i along axis 1 of a `(G, n, F)` tensor.

    Blocks of `PREFIX_BLOCK` rows are summed with a strictly lower-triangular
    matmul; block totals are prefix-summed with `ops.cumsum` over n / 16.
    """
    n, feat = ops.shape(x)[1], x.shape[2]
    x = ops.pad(x, [[0, 0], [0, (-n) % PREFIX_BLOCK], [0, 0]])
    blocks = ops.reshape(x, (-1, PREFIX_BLOCK, feat))
    within = ops.matmul(_strict_tril(PREFIX_BLOCK, x.dtype), blocks)
    totals = ops.reshape(ops.sum(blocks, axis=1), (ops.shape(x)[0], -1, feat))
    offsets = ops.cumsum(totals, axis=1) - totals
    out = ops.reshape(within, (ops.shape(x)[0], -1, PREFIX_BLOCK, feat))
    out = ops.reshape(out + ops.expand_dims(offsets, 2), (ops.shape(x)[0], -1, feat))
    return out[:, :n]


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
    phi_k, value = _common.mask_keys(phi_k, value, key_mask)
    kv0, k_sum0 = check_state(initial_state, phi_k, value, acc)

    length, heads = phi_q.shape[1], phi_q.shape[2]
    chunk = min(chunk_size, length) if length is not None else chunk_size
    q, k, v = (_heads_first_chunks(t, chunk) for t in (phi_q, phi_k, value))
    feat, vdim = q.shape[2], v.shape[2]

    # Inside each chunk: the masked C×C kernel matrix.
    scores = ops.matmul(q, ops.swapaxes(k, 1, 2)) * ops.tril(ops.ones((chunk, chunk), acc))
    numerator = ops.matmul(scores, v)
    denominator = ops.sum(scores, axis=-1)

    # Across chunks: the states of all earlier chunks, plus the initial state.
    kv_chunk = ops.matmul(ops.swapaxes(k, 1, 2), v)
    k_sum_chunk = ops.sum(k, axis=1)
    batch_heads = ops.shape(phi_q)[0] * heads
    kv_prefix = exclusive_prefix_sum(ops.reshape(kv_chunk, (batch_heads, -1, feat * vdim)))
    k_sum_prefix = exclusive_prefix_sum(ops.reshape(k_sum_chunk, (batch_heads, -1, feat)))
    if kv0 is not None:
        kv_prefix = kv_prefix + ops.reshape(kv0, (-1, 1, feat * vdim))
        k_sum_prefix = k_sum_prefix + ops.reshape(k_sum0, (-1, 1, feat))
    numerator = numerator + ops.matmul(q, ops.reshape(kv_prefix, (-1, feat, vdim)))
    # A product and sum, not an einsum: TFLite has no builtin for this contraction.
    k_sum_prefix = ops.reshape(k_sum_prefix, (-1, 1, feat))
    denominator = denominator + ops.sum(q * k_sum_prefix, axis=-1)

    out = _common.normalize(numerator, ops.expand_dims(denominator, -1), eps)
    out = _common.guard(out, factor)
    out = ops.reshape(out, (ops.shape(phi_q)[0], heads, -1, chunk, vdim))
    out = ops.reshape(ops.transpose(out, (0, 2, 3, 1, 4)), (ops.shape(phi_q)[0], -1, heads, vdim))
    out = ops.cast(out[:, : ops.shape(phi_q)[1]], out_dtype)
    if not return_state:
        return out
    return out, _final_state(kv_prefix, kv_chunk, k_sum_prefix, k_sum_chunk, phi_q, value)


def _final_state(kv_prefix, kv_chunk, k_sum_prefix, k_sum_chunk, phi_q, value) -> tuple:
    """State after the last chunk: its prefix plus its own contribution."""
    batch, heads, feat, vdim = ops.shape(phi_q)[0], phi_q.shape[2], phi_q.shape[3], value.shape[3]
    kv_chunk = ops.reshape(kv_chunk, ops.shape(kv_prefix))
    kv = kv_prefix[:, -1] + kv_chunk[:, -1]
    k_sum_prefix = ops.reshape(k_sum_prefix, (batch * heads, -1, feat))
    k_sum = k_sum_prefix[:, -1] + ops.reshape(k_sum_chunk, ops.shape(k_sum_prefix))[:, -1]
    return ops.reshape(kv, (batch, heads, feat, vdim)), ops.reshape(k_sum, (batch, heads, feat))


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
