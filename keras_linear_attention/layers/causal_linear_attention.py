"""`CausalLinearAttention`: causal self-attention that is also an RNN."""

from __future__ import annotations

from typing import Any

import keras

from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention import ops as la_ops
from keras_linear_attention._keras_compat import get_keras_mask, set_keras_mask
from keras_linear_attention.layers import _masks
from keras_linear_attention.layers.linear_multi_head_attention import (
    PACKAGE,
    LinearMultiHeadAttention,
)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalLinearAttention(LinearMultiHeadAttention):
    """Causal multi-head linear self-attention with a recurrent state.

    Position i attends to positions j ≤ i. The prefix sums
    `(kv, k_sum) = (Σ φ(k_j) v_jᵀ, Σ φ(k_j))` are an RNN state: call the layer
    on a prompt with `return_state=True`, then on one token at a time with
    `initial_state=state`; each step costs the same whatever the context
    length, and prefill-then-step outputs equal the parallel outputs.

    Constructor arguments are those of `LinearMultiHeadAttention` (weights
    and sublayer names match `keras.layers.MultiHeadAttention`, so a causal
    self-attention MHA's weights load with `set_weights`).

    Call arguments:
        inputs: `(B, N, dim)` float tensor.
        padding_mask: Optional `(B, N)` mask, truthy for real tokens; padded
            tokens add nothing to the state. Defaults to the Keras mask of
            `inputs` (e.g. from `Embedding(mask_zero=True)`).
        initial_state: Optional `(kv, k_sum)` from `get_initial_state` or a
            previous call: shapes `(B, H, D', value_dim)` and `(B, H, D')`,
            float32 (D' is the feature-map dimension).
        return_state: Also return the final state.
        training: Enables dropout and random-feature redraws.

    Example:

    >>> layer = CausalLinearAttention(num_heads=2, key_dim=8)
    >>> prompt = keras.random.normal((1, 5, 16))
    >>> out, state = layer(prompt, return_state=True)
    >>> token = keras.random.normal((1, 1, 16))
    >>> out, state = layer(token, initial_state=state, return_state=True)
    >>> out.shape
    TensorShape([1, 1, 16])
    """

    def build(self, inputs_shape):
        super().build(inputs_shape, inputs_shape)

    def call(
        self,
        inputs,
        padding_mask=None,
        initial_state=None,
        return_state=False,
        training=None,
    ):
        self._check_inputs(inputs, inputs, inputs)
        if len(inputs.shape) != 3:
            raise ValueError(
                "`inputs` must have shape (batch, length, features); received "
                f"{tuple(inputs.shape)}."
            )
        keras_mask = get_keras_mask(inputs)
        if padding_mask is None:
            padding_mask = keras_mask
        set_keras_mask(inputs, None)
        key_padding = _masks.flatten_mask("padding_mask", padding_mask, tuple(inputs.shape[:-1]))
        out, _, state = self._attend(
            inputs,
            inputs,
            inputs,
            key_padding,
            causal=True,
            training=training,
            initial_state=initial_state,
            return_state=True,
        )
        if keras_mask is not None:
            set_keras_mask(out, keras_mask)
        return (out, state) if return_state else out

    @property
    def state_shapes(self) -> tuple:
        """Shapes of `(kv, k_sum)` without the batch axis."""
        feat = fm_lib.output_dim(self._feature_map, self._key_dim)
        return (self._num_heads, feat, self._value_dim), (self._num_heads, feat)

    @property
    def state_dtype(self) -> str:
        """float32 (float64 for a float64 layer), whatever the compute dtype."""
        return "float64" if self.compute_dtype == "float64" else "float32"

    def get_initial_state(self, batch_size: Any) -> tuple:
        """Zero state `(kv, k_sum)` for `batch_size` sequences (float32)."""
        (h, d, m), _ = self.state_shapes
        return la_ops.initial_state(batch_size, h, d, m, dtype=self.state_dtype)

    def compute_output_shape(self, inputs_shape):
        return super().compute_output_shape(inputs_shape, inputs_shape)

    def compute_output_spec(
        self, inputs, padding_mask=None, initial_state=None, return_state=False, training=None
    ):
        out = keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=self.compute_dtype)
        if not return_state:
            return out
        dtype = self.state_dtype
        kv_shape, sum_shape = self.state_shapes
        batch = inputs.shape[0]
        return out, (
            keras.KerasTensor((batch, *kv_shape), dtype=dtype),
            keras.KerasTensor((batch, *sum_shape), dtype=dtype),
        )
