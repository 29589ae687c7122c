"""Linear-attention math on tensors: no layers, no weights.

Inputs are already feature-mapped: `phi_q = φ(Q)`, `phi_k = φ(K)`.
"""

from keras_linear_attention.ops._common import DEFAULT_EPS
from keras_linear_attention.ops.causal import DEFAULT_CHUNK_SIZE, causal_linear_attention
from keras_linear_attention.ops.noncausal import linear_attention
from keras_linear_attention.ops.recurrences import (
    delta_rule_attention,
    delta_rule_step,
    gated_linear_attention,
    gated_linear_attention_step,
)
from keras_linear_attention.ops.recurrent import (
    linear_attention_step,
    recurrent_linear_attention,
    zero_state,
)
from keras_linear_attention.ops.rotary import (
    rotary_attention_scores,
    rotary_causal_linear_attention,
    rotary_linear_attention,
    rotary_linear_attention_step,
    rotate,
)
from keras_linear_attention.ops.scores import kernel_attention_scores

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EPS",
    "causal_linear_attention",
    "delta_rule_attention",
    "delta_rule_step",
    "gated_linear_attention",
    "gated_linear_attention_step",
    "kernel_attention_scores",
    "linear_attention",
    "linear_attention_step",
    "recurrent_linear_attention",
    "rotary_attention_scores",
    "rotary_causal_linear_attention",
    "rotary_linear_attention",
    "rotary_linear_attention_step",
    "rotate",
    "zero_state",
]
