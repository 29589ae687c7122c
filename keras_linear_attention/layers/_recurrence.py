"""What `CausalLinearAttention` adds for the decayed, gated and delta recurrences.

`"linear"` is the paper's recurrence (feature map, normaliser, state
`(kv, k_sum)`); the others run `ops.gated_linear_attention` or
`ops.delta_rule_attention` on L2-normalised queries and keys, with one
`(B, H, D, M)` state, and normalise each head's output (RMS) instead.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_linear_attention.ops.recurrences import (
    delta_rule_attention,
    delta_rule_step,
    gated_linear_attention,
)

RECURRENCES = ("linear", "retention", "gated", "delta", "gated_delta")
GATED = ("gated", "gated_delta")
DELTA = ("delta", "gated_delta")


def check_recurrence(recurrence: Any) -> None:
    if recurrence not in RECURRENCES:
        raise ValueError(f"`recurrence` must be one of {RECURRENCES}; received {recurrence!r}.")


def retention_log_decay(num_heads: int) -> np.ndarray:
    """RetNet's fixed per-head decays, `log(1 − 2^(−5−h))`: head h keeps a
    memory of about 2^(5+h) tokens."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads))))


def per_head_dense(name: str, num_heads: int, **kwargs) -> keras.layers.Layer:
    """`(B, T, dim) -> (B, T, H)`: one scalar per head and token."""
    return keras.layers.EinsumDense(
        "btd,dh->bth",
        output_shape=(None, num_heads),
        bias_axes="h",
        name=name,
        **kwargs,
    )


def init_decay_bias(dense: keras.layers.Layer, num_heads: int) -> None:
    """Start each head's gate at RetNet's decay: with `g = −softplus(xw + b)`,
    `b = log(expm1(−log γ_h))` gives `g = log γ_h` for x·w = 0."""
    bias = np.log(np.expm1(-retention_log_decay(num_heads)))
    dense.bias.assign(ops.cast(bias, dense.bias.dtype))


def l2_normalize(x: Any) -> Any:
    """Unit vectors along the last axis (0 stays 0), in float32 or wider."""
    x = ops.cast(x, "float64" if x.dtype == "float64" else "float32")
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + 1e-12)


def mask_padded(keep: Any, k, v, log_gate, beta) -> tuple:
    """Padded tokens must leave the state as it was: no key added (k = 0),
    no decay (g = 0), no delta write (β = 0)."""
    if keep is None:
        return k, v, log_gate, beta
    keep = ops.cast(keep, "bool")
    per_head = ops.expand_dims(keep, -1)
    k = ops.where(ops.expand_dims(per_head, -1), k, 0)
    v = ops.where(ops.expand_dims(per_head, -1), v, 0)
    if log_gate is not None:
        log_gate = ops.where(per_head, log_gate, 0)
    if beta is not None:
        beta = ops.where(per_head, beta, 0)
    return k, v, log_gate, beta


def attend(recurrence, q, k, v, log_gate, beta, state, chunk_size, step: bool) -> tuple:
    """`(o (B, T, H, M), final_state)` of the recurrence; `step` runs the
    one-token form (T = 1, a state given)."""
    if step:
        o, state = delta_rule_step(
            q[:, 0], k[:, 0], v[:, 0], None if beta is None else beta[:, 0], _first(log_gate), state
        )
        return ops.expand_dims(o, 1), state
    if recurrence in DELTA:
        return delta_rule_attention(
            q, k, v, beta, log_gate, state, return_state=True, chunk_size=chunk_size
        )
    return gated_linear_attention(
        q, k, v, log_gate, state, return_state=True, chunk_size=chunk_size
    )


def _first(log_gate: Any) -> Any:
    """The step's `(B, H)` log-gate from `(B, 1, H)`; a `(H,)` one as it is."""
    if log_gate is None or len(log_gate.shape) == 1:
        return log_gate
    return log_gate[:, 0]
