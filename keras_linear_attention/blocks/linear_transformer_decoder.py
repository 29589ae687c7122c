"""`LinearTransformerDecoder`: causal self-attention with a recurrent state."""

from __future__ import annotations

import keras

from keras_linear_attention._keras_compat import get_keras_mask
from keras_linear_attention.blocks import transformer_block

PACKAGE = "keras_linear_attention"


@keras.saving.register_keras_serializable(package=PACKAGE)
class LinearTransformerDecoder(transformer_block.TransformerBlock):
    """Transformer decoder block: causal linear self-attention, optional
    linear cross-attention to an encoder output, and a feed-forward sub-block.

    The self-attention is a `CausalLinearAttention`, so the block is also an
    RNN: `return_state=True` returns its state (`(kv, k_sum)` for
    `attention="linear"`, see `CausalLinearAttention`) after the
    sequence, and `initial_state=` continues from it, one token at a time
    or in chunks, at a cost independent of the context length.

    Args:
        intermediate_dim: Hidden width of the feed-forward sub-block.
        num_heads: Number of attention heads.
        key_dim: Size of each head; defaults to `input_dim // num_heads`.
        dropout: Dropout rate.
        activation: Feed-forward activation.
        normalize_first: Pre-norm (True) or post-norm (False).
        layer_norm_epsilon: Epsilon of the layer norms.
        attention: `"linear"`, one of the recurrences of
            `CausalLinearAttention` (`"retention"`, `"gated"`, `"delta"`,
            `"gated_delta"`), or `"softmax"` (Keras MHA with a causal mask,
            for comparisons; it has no recurrent state).
        feature_map: φ for linear attention: a name, config, Keras layer or
            callable. A layer instance is used, weights and all, by the
            self-attention; the cross-attention gets a fresh φ from its config.
        kernel_initializer, bias_initializer: For every dense sublayer.
        rotary_max_wavelength: Rotary position embeddings in the
            self-attention (RoFormer's form for linear attention, see
            `LinearMultiHeadAttention`), with this max wavelength (e.g.
            10000.0); None: none. `attention="linear"` only.
        conv_size: Short convolution on q, k, v for the recurrences other
            than "linear" (see `CausalLinearAttention`).

    Call arguments:
        inputs: `(B, T, dim)` float tensor.
        padding_mask: Optional `(B, T)` mask; defaults to the Keras mask.
        encoder_outputs: Optional `(B, S, enc_dim)`: adds cross-attention
            (decided when the block is built).
        encoder_padding_mask: Optional `(B, S)` mask of `encoder_outputs`.
        initial_state: Optional self-attention state from a previous call.
        return_state: Also return the self-attention state.
        start_index: Position of the first token of `inputs` in its
            sequence (int or scalar tensor; rotary embeddings need it when
            continuing from `initial_state`).
        training: Enables dropout.

    Example:

    >>> block = LinearTransformerDecoder(intermediate_dim=32, num_heads=2)
    >>> x = keras.random.normal((1, 6, 16))
    >>> y, state = block(x[:, :5], return_state=True)
    >>> y_last = block(x[:, 5:], initial_state=state)
    >>> y_last.shape
    TensorShape([1, 1, 16])
    """

    def __init__(
        self,
        intermediate_dim: int,
        num_heads: int,
        key_dim: int | None = None,
        dropout: float = 0.0,
        activation="gelu",
        normalize_first: bool = True,
        layer_norm_epsilon: float = 1e-5,
        attention: str = "linear",
        feature_map="elu",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        conv_size: int | None = None,
        rotary_max_wavelength: float | None = None,
        **kwargs,
    ):
        super().__init__(
            intermediate_dim,
            num_heads,
            key_dim,
            dropout,
            activation,
            normalize_first,
            layer_norm_epsilon,
            attention,
            feature_map,
            kernel_initializer,
            bias_initializer,
            rotary_max_wavelength=rotary_max_wavelength,
            **kwargs,
        )
        self._cross_attention = None
        if conv_size is not None and attention not in transformer_block.RECURRENCES:
            raise ValueError(
                "`conv_size` applies to the recurrences 'retention', 'gated', 'delta' and "
                f"'gated_delta'; received it with attention={attention!r}."
            )
        self.conv_size = conv_size

    def build(self, inputs_shape, encoder_outputs_shape=None):
        key_dim = transformer_block.head_dim(inputs_shape[-1], self.num_heads, self.key_dim)
        extra = {} if self.conv_size is None else {"conv_size": self.conv_size}
        self._self_attention = self._attention("self_attention", True, key_dim, **extra)
        if self.attention != "softmax":
            self._self_attention.build(inputs_shape)
        else:
            self._self_attention.build(inputs_shape, inputs_shape)
        self._self_attention_norm = self._norm("self_attention_norm", inputs_shape)
        if encoder_outputs_shape is not None:
            # Cross-attention has no recurrence: plain linear (or softmax).
            kind = "softmax" if self.attention == "softmax" else "linear"
            self._cross_attention = self._attention(
                "cross_attention", False, key_dim, own_feature_map=False, kind=kind
            )
            self._cross_attention.build(inputs_shape, encoder_outputs_shape)
            self._cross_attention_norm = self._norm("cross_attention_norm", inputs_shape)
        self._dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self._feedforward = self._feedforward_layer(inputs_shape)
        self._feedforward_norm = self._norm("feedforward_norm", inputs_shape)

    def call(
        self,
        inputs,
        padding_mask=None,
        encoder_outputs=None,
        encoder_padding_mask=None,
        initial_state=None,
        return_state=False,
        training=None,
        start_index=0,
    ):
        self._check_call(encoder_outputs, initial_state, return_state)
        if padding_mask is None:
            padding_mask = get_keras_mask(inputs)
        state = None

        def self_attend(x):
            nonlocal state
            if self.attention == "softmax":
                out = self._self_attention(
                    x, x, value_mask=padding_mask, use_causal_mask=True, training=training
                )
            else:
                out, state = self._self_attention(
                    x,
                    padding_mask=padding_mask,
                    initial_state=initial_state,
                    return_state=True,
                    training=training,
                    start_index=start_index,
                )
            return self._dropout_layer(out, training=training)

        def cross_attend(x):
            out = self._cross_attention(
                x, encoder_outputs, value_mask=encoder_padding_mask, training=training
            )
            return self._dropout_layer(out, training=training)

        x = transformer_block.residual(
            inputs, self_attend, self._self_attention_norm, self.normalize_first
        )
        if self._cross_attention is not None:
            x = transformer_block.residual(
                x, cross_attend, self._cross_attention_norm, self.normalize_first
            )
        feedforward = lambda y: self._feedforward(y, training=training)
        x = transformer_block.residual(x, feedforward, self._feedforward_norm, self.normalize_first)
        return (x, state) if return_state else x

    def _check_call(self, encoder_outputs, initial_state, return_state):
        has_cross = self._cross_attention is not None
        if self.built and has_cross != (encoder_outputs is not None):
            raise ValueError(
                "This block was built "
                + ("with" if has_cross else "without")
                + " `encoder_outputs`; pass them consistently on every call."
            )
        if self.attention == "softmax" and (return_state or initial_state is not None):
            raise ValueError(
                "`initial_state`/`return_state` need a linear attention (not "
                "'softmax'); softmax attention has no recurrent state."
            )

    def get_config(self):
        return {**super().get_config(), "conv_size": self.conv_size}

    @property
    def has_cross_attention(self) -> bool:
        """Whether the block was built with `encoder_outputs`."""
        return self._cross_attention is not None

    @property
    def self_attention(self) -> keras.layers.Layer:
        """The causal self-attention sublayer (built with the block)."""
        return self._self_attention

    def get_initial_state(self, batch_size):
        """Zero self-attention state for `batch_size` sequences."""
        return self._self_attention.get_initial_state(batch_size)

    def compute_output_spec(
        self,
        inputs,
        padding_mask=None,
        encoder_outputs=None,
        encoder_padding_mask=None,
        initial_state=None,
        return_state=False,
        training=None,
        start_index=0,
    ):
        out = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not return_state:
            return out
        _, state = self._self_attention.compute_output_spec(inputs, return_state=True)
        return out, state
