"""The chunkwise causal algorithm, with a hand-written gradient.

Inside, tensors are grouped by sequence (G = batch × heads) and chunk (n
chunks of C tokens), flattened to `(G*n, C, F)`. Per chunk c:

    A_c   = tril(q_c k_cᵀ)                       (C×C, inside the chunk)
    P_c   = S_0 + Σ_{c'<c} k_c'ᵀ v_c'             (D×M, earlier chunks)
    Z_c   = z_0 + Σ_{c'<c} Σ_j k_c'j              (D)
    out_c = (A_c v_c + q_c P_c) / (A_c 1 + q_c Z_c + eps)

The backward pass is written out (paper eqs. 13-15, chunked). Gradients of
the prefixes are suffix sums over chunks, the mirror image of the forward
pass. Besides its inputs it keeps only the prefixes, the normaliser and the
output, and recomputes A_c, instead of autodiff's copy of every intermediate.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from keras_linear_attention.ops import _common

# Chunk states are prefix-summed in blocks of this many chunks with one small
# triangular matmul each, and the block totals the same way once more; only
# the totals of those go through `ops.cumsum`. TF's cumsum streams slowly on
# CPU (about 10 ns per element) and XLA's grows superlinearly with the scanned
# length (over (8, n, 64, 64) along n: 73 ms at n = 256, 779 ms at n = 1024;
# benchmarks/README.md, "How the layers get there"), so the scanned axis stays
# N / (C * 256) long.
PREFIX_BLOCK = 16
PREFIX_LEVELS = 2


def _blocked_exclusive_sum(x: Any, offset: Any, reverse: bool, levels: int = PREFIX_LEVELS) -> Any:
    """Exclusive prefix (or, reversed, suffix) sum along axis 1 of `(G, n, F)`,
    plus an optional `(G, F)` offset, added to the small block totals only."""
    n, feat = ops.shape(x)[1], x.shape[2]
    x = ops.pad(x, [[0, 0], [0, (-n) % PREFIX_BLOCK], [0, 0]])
    groups = ops.shape(x)[0]
    blocks = ops.reshape(x, (-1, PREFIX_BLOCK, feat))
    strict = ops.tril(ops.ones((PREFIX_BLOCK, PREFIX_BLOCK), x.dtype), -1)
    within = ops.matmul(ops.transpose(strict) if reverse else strict, blocks)
    totals = ops.reshape(ops.sum(blocks, axis=1), (groups, -1, feat))
    if levels > 1:
        offsets = _blocked_exclusive_sum(totals, None, reverse, levels - 1)
    elif reverse:
        offsets = ops.sum(totals, axis=1, keepdims=True) - ops.cumsum(totals, axis=1)
    else:
        offsets = ops.cumsum(totals, axis=1) - totals
    if offset is not None:
        offsets = offsets + ops.expand_dims(offset, 1)
    out = ops.reshape(within, (groups, -1, PREFIX_BLOCK, feat)) + ops.expand_dims(offsets, 2)
    return ops.reshape(out, (groups, -1, feat))[:, :n]


def exclusive_prefix_sum(x: Any, initial: Any = None) -> Any:
    """`initial + Σ_{j<i} x[:, j]` along axis 1 of a `(G, n, F)` tensor."""
    return _blocked_exclusive_sum(x, initial, reverse=False)


def exclusive_suffix_sum(x: Any, final: Any = None) -> Any:
    """`final + Σ_{j>i} x[:, j]` along axis 1 of a `(G, n, F)` tensor."""
    return _blocked_exclusive_sum(x, final, reverse=True)


def _chunk_prefix(per_chunk: Any, groups: Any, initial: Any) -> tuple:
    """Per chunk, `initial` plus the sum over earlier chunks of `(G*n, ...)`
    values; and the total after the last chunk, flat `(G, F)`."""
    inner = per_chunk.shape[1:]
    flat = ops.reshape(per_chunk, (groups, -1, math.prod(inner)))
    prefix = exclusive_prefix_sum(flat, initial)
    return ops.reshape(prefix, (-1, *inner)), prefix[:, -1] + flat[:, -1]


def _chunk_suffix(per_chunk: Any, groups: Any, final: Any) -> tuple:
    """Gradient of `_chunk_prefix`: per chunk, `final` (the upstream gradient
    of the last total) plus the sum over later chunks; and the gradient of
    `initial`, flat `(G, F)`: `final` plus the sum over all chunks."""
    inner = per_chunk.shape[1:]
    flat = ops.reshape(per_chunk, (groups, -1, math.prod(inner)))
    suffix = exclusive_suffix_sum(flat, final)
    return ops.reshape(suffix, (-1, *inner)), suffix[:, 0] + flat[:, 0]


def chunk_for(chunk_size: int, x: Any) -> Any:
    """The chunk length for a `(B, N, ...)` sequence, `min(chunk_size, N)`:
    a chunk never exceeds the sequence.

    Padding N up to a larger chunk costs C×C work per chunk for nothing (a
    chunk of 4096 at N = 13), and a huge one cannot even be built. With N
    unknown until run time (a `tf.function` over any length), C is then a
    scalar tensor and the chunked shapes are dynamic.
    """
    length = x.shape[1]
    if length is not None:
        return min(chunk_size, length)
    return ops.minimum(ops.shape(x)[1], chunk_size)


def to_chunks(x: Any, chunk: int) -> Any:
    """(B, N, H, F) -> (B*H*n, C, F): zero-pad N to n*C, group by head.

    Rank-3 batched matmuls over these need no further transposes (TFLite's
    BATCH_MATMUL also takes them as they are).
    """
    n = ops.shape(x)[1]
    x = ops.pad(x, [[0, 0], [0, (-n) % chunk], [0, 0], [0, 0]])
    x = ops.reshape(x, (ops.shape(x)[0], -1, chunk, x.shape[2], x.shape[3]))
    return ops.reshape(ops.transpose(x, (0, 3, 1, 2, 4)), (-1, chunk, x.shape[4]))


def from_chunks(x: Any, batch: Any, length: Any, heads: int) -> Any:
    """Inverse of `to_chunks`: `(B*H*n, C, F)` -> `(B, length, H, F)`."""
    x = ops.reshape(x, (batch, heads, -1, chunk_length(x), x.shape[2]))
    x = ops.transpose(x, (0, 2, 3, 1, 4))
    return ops.reshape(x, (batch, -1, heads, x.shape[4]))[:, :length]


def chunk_length(x: Any) -> Any:
    """C of a chunked `(G*n, C, F)` tensor: static, or (for a sequence length
    unknown until run time, see `ops.causal`) a scalar tensor."""
    return x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]


def _flat_or_none(state: Any, groups: Any) -> Any:
    return None if state is None else ops.reshape(state, (groups, -1))


def chunked_causal_attention(
    q: Any, k: Any, v: Any, initial_kv: Any, initial_k_sum: Any, shape: tuple, eps: float
) -> tuple:
    """Causal linear attention over chunks, with a hand-written gradient.

    Args:
        q, k: `(B*H*n, C, D)` feature-mapped, chunked queries and keys (keys
            masked), as `to_chunks` makes them.
        v: `(B*H*n, C, M)` chunked values.
        initial_kv, initial_k_sum: Initial state, `(B, H, D, M)` and `(B, H, D)`, or both None.
        shape: `(B, N, H)` of the unchunked sequence (N ≤ n*C; the padding
            is dropped from the output).
        eps: Added to the normaliser; a normaliser of exactly 0 becomes 1
            (its numerator is 0 too, so the output is 0, not NaN).

    Returns:
        `(out, kv, k_sum)`: `(B, N, H, M)` outputs and the final state.

    The output is returned in its final layout, so the copy kept for the
    backward pass is the one the caller keeps anyway. The chunked inputs
    are kept as they are: the attention layers apply φ to chunks, so φ's own
    gradient keeps the very same tensors.
    """
    swap = lambda x: ops.swapaxes(x, 1, 2)
    batch, length, heads = shape
    chunk, feat, vdim = chunk_length(q), q.shape[2], v.shape[2]
    groups = batch * heads
    # Built inside each traced function, never closed over: JAX's
    # custom_gradient under a `cond` (a causal mask decided by its values)
    # cannot take an array of the enclosing trace as a constant.
    lower = lambda: ops.tril(ops.ones((chunk, chunk), q.dtype))

    def forward(q, k, v, initial_kv, initial_k_sum):
        tril = lower()
        initial_kv, initial_k_sum = (
            _flat_or_none(initial_kv, groups),
            _flat_or_none(initial_k_sum, groups),
        )
        scores = ops.matmul(q, swap(k)) * tril
        prefix, kv = _chunk_prefix(ops.matmul(swap(k), v), groups, initial_kv)
        k_sum_prefix, k_sum = _chunk_prefix(ops.sum(k, axis=1), groups, initial_k_sum)
        k_sum_prefix = ops.expand_dims(k_sum_prefix, 1)
        numerator = ops.matmul(scores, v) + ops.matmul(q, prefix)
        # q·k_sum as a matmul: one read of q, no q-sized product.
        denominator, zero = _common.safe_denominator(
            ops.sum(scores, axis=-1, keepdims=True) + ops.matmul(q, swap(k_sum_prefix)), eps
        )
        out = from_chunks(numerator / denominator, batch, length, heads)
        kv, k_sum = (
            ops.reshape(kv, (batch, heads, feat, vdim)),
            ops.reshape(k_sum, (batch, heads, feat)),
        )
        return (out, kv, k_sum), (prefix, k_sum_prefix, denominator, zero)

    if keras.backend.backend() == "torch":
        # Keras's torch custom_gradient takes one output; this has three, so
        # torch differentiates the forward ops itself (same math).
        return forward(q, k, v, initial_kv, initial_k_sum)[0]

    @ops.custom_gradient
    def attend(q, k, v, *state):
        (out, kv, k_sum), (prefix, k_sum_prefix, denominator, zero) = forward(
            q, k, v, *(state or (None,) * 2)
        )

        def grad(*args, upstream=None):
            tril = lower()
            # TF passes one gradient per output; JAX passes one tuple.
            upstream = args if upstream is None else upstream
            if len(upstream) == 1:
                upstream = upstream[0]
            g_out, g_kv, g_z = (
                ops.zeros_like(ref) if g is None else g
                for g, ref in zip(upstream, (out, kv, k_sum), strict=True)
            )
            # Each step starts after the previous one (`scheduled_after`): at most
            # a few (G*n, C, ·) temporaries are alive at once, and the
            # recomputed scores are not moved into the forward pass.
            g_out = _common.scheduled_after(g_out, out)
            g_den = _common.denominator_gradient(
                g_out, out, denominator, zero, lambda x: to_chunks(x, chunk)
            )
            g_num = to_chunks(g_out, chunk) / denominator
            g_prefix, g_initial_kv = _chunk_suffix(
                ops.matmul(swap(q), g_num), groups, ops.reshape(g_kv, (groups, -1))
            )
            g_k_sum_prefix, g_initial_k_sum = _chunk_suffix(
                ops.matmul(swap(q), g_den)[..., 0], groups, ops.reshape(g_z, (groups, -1))
            )
            # Recomputed, transposed: as large as q when C = D.
            scores_t = ops.matmul(_common.scheduled_after(k, g_prefix), swap(q)) * ops.transpose(
                tril
            )
            g_v = ops.matmul(scores_t, g_num) + ops.matmul(k, g_prefix)
            g_scores = (ops.matmul(_common.scheduled_after(g_num, g_v), swap(v)) + g_den) * tril
            g_k = ops.matmul(swap(g_scores), q) + ops.matmul(
                _common.scheduled_after(v, g_scores), swap(g_prefix)
            )
            g_k = g_k + ops.expand_dims(g_k_sum_prefix, 1)
            g_num, g_den, g_scores = (
                _common.scheduled_after(g, g_k) for g in (g_num, g_den, g_scores)
            )
            g_q = ops.matmul(g_scores, k) + ops.matmul(g_num, swap(prefix)) + g_den * k_sum_prefix
            # Released together, so the layers' gradients downstream start
            # once this function's temporaries are gone.
            g_k, g_v = _common.scheduled_after(g_k, g_q), _common.scheduled_after(g_v, g_q)
            if not state:
                return g_q, g_k, g_v
            g_state = (
                ops.reshape(g, ops.shape(s))
                for g, s in zip((g_initial_kv, g_initial_k_sum), state, strict=True)
            )
            return (g_q, g_k, g_v, *g_state)

        return (out, kv, k_sum), grad

    return attend(q, k, v) if initial_kv is None else attend(q, k, v, initial_kv, initial_k_sum)
