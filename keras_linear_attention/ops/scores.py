"""The explicit kernel-attention matrix: a quadratic diagnostic."""

from __future__ import annotations

from typing import Any

from keras import ops

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
