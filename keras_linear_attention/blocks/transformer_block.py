"""Pieces shared by the encoder and decoder blocks."""

from __future__ import annotations

from typing import Any

import keras

from keras_linear_attention import _checks
from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention.layers import _recurrence
from keras_linear_attention.layers.causal_linear_attention import CausalLinearAttention
from keras_linear_attention.layers.linear_multi_head_attention import LinearMultiHeadAttention

# "linear" and "softmax" attend in any block; the other recurrences
# (`CausalLinearAttention(recurrence=...)`) are causal self-attention only.
RECURRENCES = tuple(r for r in _recurrence.RECURRENCES if r != "linear")
ATTENTION_KINDS = ("linear", "softmax", *RECURRENCES)


def check_block_args(num_heads: Any, intermediate_dim: Any, dropout: Any, attention: str) -> None:
    _checks.check_positive_int("num_heads", num_heads)
    _checks.check_positive_int("intermediate_dim", intermediate_dim)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be a float in [0, 1); received {dropout!r}.")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"`attention` must be one of {ATTENTION_KINDS}; received {attention!r}.")


def head_dim(hidden_dim: int, num_heads: int, key_dim: int | None) -> int:
    if key_dim is not None:
        return key_dim
    if hidden_dim % num_heads:
        raise ValueError(
            f"The input feature dim ({hidden_dim}) must be divisible by `num_heads` "
            f"({num_heads}), or pass `key_dim`."
        )
    return hidden_dim // num_heads


def initializers(kernel_initializer, bias_initializer) -> dict:
    """Fresh initializer objects per sublayer, so seeded ones do not repeat."""
    clone = lambda init: keras.initializers.get(keras.initializers.serialize(init))
    return {
        "kernel_initializer": clone(kernel_initializer),
        "bias_initializer": clone(bias_initializer),
    }


def attention_layer(kind: str, causal_state: bool, name: str, **kwargs) -> keras.layers.Layer:
    """Linear (optionally the stateful causal layer, with any recurrence) or
    Keras softmax MHA."""
    if kind == "softmax":
        kwargs.pop("feature_map", None)
        return keras.layers.MultiHeadAttention(name=name, **kwargs)
    if causal_state:
        return CausalLinearAttention(name=name, recurrence=kind, **kwargs)
    if kind != "linear":
        raise ValueError(
            f"attention={kind!r} is a causal recurrence: it runs as the self-attention "
            "of a `LinearTransformerDecoder` only. Use 'linear' or 'softmax' here."
        )
    return LinearMultiHeadAttention(name=name, **kwargs)


class FeedForward(keras.layers.Layer):
    """Dense → activation → dropout → Dense → dropout (not serialized alone);
    every sublayer takes this layer's dtype policy."""

    def __init__(self, intermediate_dim, activation, dropout, initializers, **kwargs):
        super().__init__(**kwargs)
        self._intermediate = keras.layers.Dense(
            intermediate_dim,
            activation=activation,
            name="intermediate",
            dtype=self.dtype_policy,
            **initializers,
        )
        self._hidden_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self._output_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self._initializers = initializers
        self._output = None

    def build(self, inputs_shape):
        self._output = keras.layers.Dense(
            inputs_shape[-1], name="output", dtype=self.dtype_policy, **self._initializers
        )
        self._intermediate.build(inputs_shape)
        self._output.build((*inputs_shape[:-1], self._intermediate.units))

    def call(self, x, training=None):
        x = self._hidden_dropout(self._intermediate(x), training=training)
        return self._output_dropout(self._output(x), training=training)


def residual(x, sublayer, norm, normalize_first: bool):
    """Pre-norm `x + f(norm(x))` or post-norm `norm(x + f(x))`."""
    if normalize_first:
        return x + sublayer(norm(x))
    return norm(x + sublayer(x))


class _Untracked:
    """Holds a layer out of sight of Keras's attribute tracking and saving."""

    def __init__(self, value: Any):
        self.value = value


class TransformerBlock(keras.layers.Layer):
    """Arguments, config and sublayer factories shared by the encoder and decoder.

    Every sublayer (attention and its φ, norms, feed-forward, dropout) is
    created with the block's dtype policy, so `dtype="mixed_bfloat16"` on
    the block runs all of it in bfloat16 with float32 variables.
    """

    def __init__(
        self,
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
        rotary_max_wavelength=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_block_args(num_heads, intermediate_dim, dropout, attention)
        if rotary_max_wavelength is not None and attention != "linear":
            raise ValueError(
                "`rotary_max_wavelength` (rotary position embeddings) needs "
                f"attention='linear'; received attention={attention!r}."
            )
        self.rotary_max_wavelength = rotary_max_wavelength
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.key_dim = key_dim
        self.dropout = dropout
        self.activation = keras.activations.get(activation)
        self.normalize_first = normalize_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention = attention
        # The instance itself, so a trained or customised φ keeps its weights.
        # Held untracked: once built, it is the self-attention's (weights and
        # saved paths as before), and Keras would otherwise walk it twice.
        self._given_feature_map = _Untracked(fm_lib.get(feature_map))
        # φ computes in the block's policy (as the attention will set it), so
        # the config is the same before and after build.
        self._given_feature_map.value.dtype_policy = self.dtype_policy
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True

    def _initializers(self) -> dict:
        return initializers(self.kernel_initializer, self.bias_initializer)

    def _norm(self, name, shape):
        norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name=name, dtype=self.dtype_policy
        )
        norm.build(shape)
        return norm

    @property
    def feature_map(self) -> dict:
        """The config of φ (the instance is the self-attention's `feature_map`)."""
        config = fm_lib.serialize(self._given_feature_map.value)
        config.pop("build_config", None)  # the same config, built or not
        return config

    def _attention(self, name, causal_state, key_dim, own_feature_map=True, kind=None, **extra):
        """An attention sublayer; the self-attention uses the φ instance the
        block was given (and the rotary embeddings), any other one
        (cross-attention) a fresh φ from its config, as one φ cannot serve
        two attention layers (`fm_lib.adopt`)."""
        feature_map = self._given_feature_map.value
        if not own_feature_map:
            feature_map = fm_lib.get(self.feature_map)
        elif self.rotary_max_wavelength is not None:
            extra["rotary_max_wavelength"] = self.rotary_max_wavelength
        return attention_layer(
            kind or self.attention,
            causal_state=causal_state,
            name=name,
            num_heads=self.num_heads,
            key_dim=key_dim,
            dropout=self.dropout,
            feature_map=feature_map,
            dtype=self.dtype_policy,
            **self._initializers(),
            **extra,
        )

    def _feedforward_layer(self, shape):
        layer = FeedForward(
            self.intermediate_dim,
            self.activation,
            self.dropout,
            self._initializers(),
            name="feedforward",
            dtype=self.dtype_policy,
        )
        layer.build(shape)
        return layer

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "key_dim": self.key_dim,
            "dropout": self.dropout,
            "activation": keras.activations.serialize(self.activation),
            "normalize_first": self.normalize_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attention": self.attention,
            "feature_map": self.feature_map,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "rotary_max_wavelength": self.rotary_max_wavelength,
        }
