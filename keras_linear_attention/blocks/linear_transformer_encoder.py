"""`LinearTransformerEncoder`: self-attention + feed-forward, linear in length."""

from __future__ import annotations

import keras

from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention._keras_compat import get_keras_mask
from keras_linear_attention.blocks import _sublayers

PACKAGE = "keras_linear_attention"


@keras.saving.register_keras_serializable(package=PACKAGE)
class LinearTransformerEncoder(keras.layers.Layer):
    """Transformer encoder block with linear (or, for comparison, softmax) attention.

    `x + Attention(norm(x))`, then `x + FeedForward(norm(x))` (pre-norm, the
    default), or the post-norm order of Vaswani et al. with `norm_first=False`.

    Args:
        num_heads: Number of attention heads.
        intermediate_dim: Hidden width of the feed-forward sub-block.
        key_dim: Size of each head; defaults to `input_dim // num_heads`.
        dropout: Dropout rate for attention and feed-forward outputs.
        activation: Feed-forward activation.
        norm_first: Pre-norm (True) or post-norm (False).
        layer_norm_epsilon: Epsilon of the layer norms.
        attention: `"linear"` (this package) or `"softmax"` (Keras MHA), so
            the same model can be trained both ways.
        causal: Attend only to positions j ≤ i.
        feature_map: φ for linear attention (see `feature_maps.get`).
        kernel_initializer, bias_initializer: For every dense sublayer.

    Call arguments:
        inputs: `(B, N, dim)` float tensor.
        padding_mask: Optional `(B, N)` mask, truthy for real tokens. Defaults
            to the Keras mask of `inputs`.
        training: Enables dropout.

    Example:

    >>> block = LinearTransformerEncoder(num_heads=2, intermediate_dim=32)
    >>> block(keras.random.normal((2, 10, 16))).shape
    TensorShape([2, 10, 16])
    """

    def __init__(
        self,
        num_heads: int,
        intermediate_dim: int,
        key_dim: int | None = None,
        dropout: float = 0.0,
        activation="gelu",
        norm_first: bool = True,
        layer_norm_epsilon: float = 1e-5,
        attention: str = "linear",
        causal: bool = False,
        feature_map="elu",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _sublayers.check_block_args(num_heads, intermediate_dim, dropout, attention)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.key_dim = key_dim
        self.dropout = dropout
        self.activation = keras.activations.get(activation)
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention = attention
        self.causal = causal
        # Kept as a config: each build makes its own φ layer (FAVOR has weights).
        self.feature_map = fm_lib.serialize(fm_lib.get(feature_map))
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True

    def build(self, inputs_shape):
        hidden = inputs_shape[-1]
        inits = _sublayers.initializers(self.kernel_initializer, self.bias_initializer)
        self._attention_layer = _sublayers.attention_layer(
            self.attention,
            causal_state=False,
            name="self_attention",
            num_heads=self.num_heads,
            key_dim=_sublayers.head_dim(hidden, self.num_heads, self.key_dim),
            dropout=self.dropout,
            feature_map=fm_lib.get(self.feature_map),
            **inits,
        )
        self._attention_layer.build(inputs_shape, inputs_shape)
        self._attention_dropout = keras.layers.Dropout(self.dropout)
        self._attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="self_attention_norm"
        )
        self._attention_norm.build(inputs_shape)
        self._feedforward = _sublayers.FeedForward(
            self.intermediate_dim, self.activation, self.dropout, inits, name="feedforward"
        )
        self._feedforward.build(inputs_shape)
        self._feedforward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="feedforward_norm"
        )
        self._feedforward_norm.build(inputs_shape)

    def call(self, inputs, padding_mask=None, training=None):
        if padding_mask is None:
            padding_mask = get_keras_mask(inputs)

        def attend(x):
            out = self._attention_layer(
                x, x, value_mask=padding_mask, use_causal_mask=self.causal, training=training
            )
            return self._attention_dropout(out, training=training)

        x = _sublayers.residual(inputs, attend, self._attention_norm, self.norm_first)
        feedforward = lambda y: self._feedforward(y, training=training)  # noqa: E731
        return _sublayers.residual(x, feedforward, self._feedforward_norm, self.norm_first)

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "key_dim": self.key_dim,
            "dropout": self.dropout,
            "activation": keras.activations.serialize(self.activation),
            "norm_first": self.norm_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attention": self.attention,
            "causal": self.causal,
            "feature_map": self.feature_map,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
