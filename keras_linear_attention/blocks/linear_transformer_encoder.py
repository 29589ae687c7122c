"""`LinearTransformerEncoder`: self-attention + feed-forward, linear in length."""

from __future__ import annotations

import keras

from keras_linear_attention._keras_compat import get_keras_mask
from keras_linear_attention.blocks import transformer_block

PACKAGE = "keras_linear_attention"


@keras.saving.register_keras_serializable(package=PACKAGE)
class LinearTransformerEncoder(transformer_block.TransformerBlock):
    """Transformer encoder block with linear (or, for comparison, softmax) attention.

    `x + Attention(norm(x))`, then `x + FeedForward(norm(x))` (pre-norm, the
    default), or the post-norm order of Vaswani et al. with `normalize_first=False`.

    Args:
        intermediate_dim: Hidden width of the feed-forward sub-block.
        num_heads: Number of attention heads.
        key_dim: Size of each head; defaults to `input_dim // num_heads`.
        dropout: Dropout rate for attention and feed-forward outputs.
        activation: Feed-forward activation.
        normalize_first: Pre-norm (True) or post-norm (False).
        layer_norm_epsilon: Epsilon of the layer norms.
        attention: `"linear"` (this package) or `"softmax"` (Keras MHA), so
            the same model can be trained both ways.
        causal: Attend only to positions j ≤ i.
        feature_map: φ for linear attention (see `feature_maps.get`); a layer
            instance is used as is, weights and all, by the self-attention.
        kernel_initializer, bias_initializer: For every dense sublayer.
        rotary_max_wavelength: Rotary position embeddings in the
            self-attention (RoFormer's form for linear attention, see
            `LinearMultiHeadAttention`), with this max wavelength (e.g.
            10000.0); None: none. `attention="linear"` only.

    Call arguments:
        inputs: `(B, N, dim)` float tensor.
        padding_mask: Optional `(B, N)` mask, truthy for real tokens. Defaults
            to the Keras mask of `inputs`.
        training: Enables dropout.

    Example:

    >>> block = LinearTransformerEncoder(intermediate_dim=32, num_heads=2)
    >>> block(keras.random.normal((2, 10, 16))).shape
    TensorShape([2, 10, 16])
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
        causal: bool = False,
        feature_map="elu",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        rotary_max_wavelength: float | None = None,
        **kwargs,
    ):
        if attention in transformer_block.RECURRENCES:
            raise ValueError(
                f"attention={attention!r} is a causal recurrence with a state: use "
                "`LinearTransformerDecoder`. The encoder takes 'linear' or 'softmax'."
            )
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
        self.causal = causal

    def build(self, inputs_shape):
        key_dim = transformer_block.head_dim(inputs_shape[-1], self.num_heads, self.key_dim)
        self._attention_layer = self._attention("self_attention", False, key_dim)
        self._attention_layer.build(inputs_shape, inputs_shape)
        self._attention_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self._attention_norm = self._norm("self_attention_norm", inputs_shape)
        self._feedforward = self._feedforward_layer(inputs_shape)
        self._feedforward_norm = self._norm("feedforward_norm", inputs_shape)

    def call(self, inputs, padding_mask=None, training=None):
        if padding_mask is None:
            padding_mask = get_keras_mask(inputs)

        def attend(x):
            out = self._attention_layer(
                x, x, value_mask=padding_mask, use_causal_mask=self.causal, training=training
            )
            return self._attention_dropout(out, training=training)

        x = transformer_block.residual(inputs, attend, self._attention_norm, self.normalize_first)
        feedforward = lambda y: self._feedforward(y, training=training)
        return transformer_block.residual(
            x, feedforward, self._feedforward_norm, self.normalize_first
        )

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        return {**super().get_config(), "causal": self.causal}
