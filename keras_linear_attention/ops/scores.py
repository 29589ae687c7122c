"""The explicit kernel-attention matrix: a quadratic diagnostic, and the
short-sequence path of the attention ops (`quadratic_attention`)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.ops import _common


def kernel_attention_scores(
    phi_q: Any,
    phi_k: Any,
    key_mask: Any = None,
    causal: bool = False,
    eps: float = _common.DEFAULT_EPS,
) -> Any:
    """Normalised `(B, H, T, S)` matrix `A` with `linear_attention = A @ V`.

    `A_ij = φ(q_i)·φ(k_j) / (Σ_j' φ(q_i)·φ(k_j') + eps)` over unmasked (and,
    if `causal`, j ≤ i) keys. Costs O(T·S) time and memory: for inspection
    and plots, never for the forward pass.
    """
    phi_q, phi_k = ops.convert_to_tensor(phi_q), ops.convert_to_tensor(phi_k)
    acc = _common.accumulation_dtype(phi_q, phi_k)
    phi_q, phi_k = _common.cast_all(acc, phi_q, phi_k)
    phi_k, _ = _common.mask_keys(phi_k, None, key_mask)
    scores = ops.einsum("bthd,bshd->bhts", phi_q, phi_k)
    if causal:
        t, s = ops.shape(scores)[2], ops.shape(scores)[3]
        scores = scores * ops.cast(ops.tril(ops.ones((t, s))), acc)
    return _common.normalize(scores, ops.sum(scores, axis=-1, keepdims=True), eps)


def quadratic_attention(
    q: Any,
    k: Any,
    v: Any,
    causal: bool,
    eps: float,
    state: tuple | None = None,
    return_state: bool = False,
) -> tuple:
    """Kernel attention through the explicit masked T×S matrix, with a
    hand-written gradient: the short-sequence path of the attention ops.

    Args:
        q, k: Heads-first feature-mapped queries `(B, H, T, D)` and keys
            `(B, H, S, D)`, in the accumulation dtype, padded keys zeroed.
        v: Heads-first values `(B, H, S, M)`, padded values zeroed.
        causal: Keep `A_ij` for j ≤ i only (T = S).
        eps: Added to the normaliser (an exact 0 becomes 1, as in
            `_common.normalize`).
        state: Optional `(initial_kv, initial_k_sum)`, `(B, H, D, M)` and `(B, H, D)`: earlier
            keys' sums, which every query also sees (causal continuation).
        return_state: Also return the final `(kv, k_sum)`: `state` plus this
            call's key sums.

    Returns:
        `(out, kv, k_sum)`: `(B, T, H, M)` outputs (the layout the callers
        keep) and the final state, or None for both unless `return_state`.

    `out_i = (Σ_j A_ij v_j + φ(q_i)ᵀkv0) / (Σ_j A_ij + φ(q_i)ᵀz0 + eps)` with
    `A = φ(Q)φ(K)ᵀ` masked: the math of the chunked and global forms, in a
    handful of large matmuls. It costs O(T·S) time and keeps one `(B, H,
    T, S)` matrix for the backward pass (like softmax attention's
    probabilities), so it is used for short sequences only.
    """
    swap = lambda x: ops.swapaxes(x, 2, 3)
    keep = ops.tril if causal else (lambda x: x)
    heads_first = heads_last = lambda x: ops.transpose(x, (0, 2, 1, 3))

    def forward(q, k, v, initial_kv, initial_k_sum):
        scores = keep(ops.matmul(q, swap(k)))
        numerator = ops.matmul(scores, v)
        denominator = ops.sum(scores, axis=-1, keepdims=True)
        if initial_kv is not None:
            numerator = numerator + ops.matmul(q, initial_kv)
            denominator = denominator + ops.matmul(q, ops.expand_dims(initial_k_sum, -1))
        denominator, zero = _common.safe_denominator(denominator, eps)
        out = numerator / denominator
        kv = k_sum = None
        if return_state:
            kv, k_sum = ops.matmul(swap(k), v), ops.sum(k, axis=2)
            if initial_kv is not None:
                kv, k_sum = kv + initial_kv, k_sum + initial_k_sum
        return heads_last(out), kv, k_sum, (scores, denominator, zero)

    initial_kv, initial_k_sum = (None, None) if state is None else state
    if keras.backend.backend() == "torch":
        # Keras's torch custom_gradient takes one output: torch
        # differentiates the forward ops itself (same math).
        return forward(q, k, v, initial_kv, initial_k_sum)[:3]

    @ops.custom_gradient
    def attend(q, k, v, *state):
        out, kv, k_sum, (scores, denominator, zero) = forward(q, k, v, *(state or (None,) * 2))

        def grad(*args, upstream=None):
            # TF passes one gradient per output; JAX passes one tuple.
            upstream = args if upstream is None else upstream
            if isinstance(upstream, (tuple, list)) and len(upstream) == 1:
                upstream = upstream[0]
            g_out = upstream
            if return_state:
                g_out, g_kv, g_z = (
                    ops.zeros_like(ref) if g is None else g
                    for g, ref in zip(upstream, (out, kv, k_sum), strict=True)
                )
            # `after`: starts once the output exists (see `_common.after`).
            g_out = _common.scheduled_after(g_out, out)
            g_den = _common.denominator_gradient(g_out, out, denominator, zero, heads_first)
            g_num = heads_first(g_out) / denominator
            g_scores = keep(ops.matmul(g_num, swap(v)) + g_den)
            g_q = ops.matmul(g_scores, k)
            g_k = ops.matmul(swap(g_scores), q)
            g_v = ops.matmul(swap(scores), g_num)
            if state:
                g_q = g_q + ops.matmul(g_num, swap(state[0])) + g_den * ops.expand_dims(state[1], 2)
            if return_state:
                g_k = g_k + ops.matmul(v, swap(g_kv)) + ops.expand_dims(g_z, 2)
                g_v = g_v + ops.matmul(k, g_kv)
            if not state:
                return g_q, g_k, g_v
            g_kv0 = ops.matmul(swap(q), g_num)
            g_initial_k_sum = ops.matmul(swap(q), g_den)[..., 0]
            if return_state:
                g_kv0, g_initial_k_sum = g_kv0 + g_kv, g_initial_k_sum + g_z
            return g_q, g_k, g_v, g_kv0, g_initial_k_sum

        return ((out, kv, k_sum) if return_state else out), grad

    result = attend(q, k, v) if state is None else attend(q, k, v, *state)
    return result if return_state else (result, None, None)


def check_threshold(threshold: Any) -> None:
    """`short_sequence_threshold` must be None (the default) or an int ≥ 0."""
    _checks.check_int("short_sequence_threshold", threshold, 0, allow_none=True)


def use_quadratic(threshold: Any, default: int, *lengths: Any) -> Any:
    """Whether every one of `lengths` is at most `threshold` (`default` when
    None; 0: never): a Python bool, or a scalar bool tensor when a length is
    known only at run time (a scalar tensor from `ops.shape`), for a `cond`.

    A run-time length under XLA takes the long path (False): XLA compiles
    both branches of a cond's gradient, and the untaken branch's shape
    arithmetic on placeholder values yields negative paddings. (XLA
    compiles each concrete shape anyway; a static length avoids this.)
    """
    threshold = default if threshold is None else threshold
    if threshold == 0 or any(isinstance(n, int) and n > threshold for n in lengths):
        return False
    dynamic = [ops.less_equal(n, threshold) for n in lengths if not isinstance(n, int)]
    if not dynamic:
        return True
    if _in_xla():
        return False
    return ops.all(ops.stack(dynamic))


def _in_xla() -> bool:
    """Whether a TensorFlow graph being built is XLA-compiled (a
    `jit_compile=True` function, Keras's `jit_compile`); True if unknown."""
    if keras.backend.backend() != "tensorflow":
        return True
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TF without the helper
        return True
    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def length(x: Any, axis: int = 1) -> Any:
    """`x.shape[axis]`, or a scalar tensor when it is known only at run time."""
    return x.shape[axis] if x.shape[axis] is not None else ops.shape(x)[axis]
