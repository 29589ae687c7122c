"""Learned and sinusoidal position embeddings with a start offset for stepping."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_linear_attention import _checks

PACKAGE = "keras_linear_attention"


def _positions(inputs, start_index):
    """Integer positions `start_index + [0, T)` for `(B, T, ...)` inputs."""
    length = ops.shape(inputs)[1]
    return ops.arange(length, dtype="int32") + ops.cast(start_index, "int32")


def _broadcast(table, inputs):
    """`(T, dim)` → `(B, T, dim)` like `inputs`, so merge layers see equal ranks."""
    return ops.broadcast_to(ops.expand_dims(table, 0), ops.shape(inputs))


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute position embeddings, shaped like the inputs.

    Args:
        max_length: Longest sequence (prompt plus generated tokens).
        initializer: Initializer of the `(max_length, dim)` table.

    Call arguments:
        inputs: `(B, T, dim)` tensor; only its shape is used.
        start_index: Position of the first token (an int or scalar tensor);
            non-zero when stepping through a sequence one token at a time.

    Example:

    >>> x = keras.random.normal((2, 5, 8))
    >>> (x + PositionEmbedding(max_length=16)(x)).shape
    TensorShape([2, 5, 8])
    """

    def __init__(self, max_length: int, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        _checks.check_positive_int("max_length", max_length)
        self.max_length = max_length
        self.initializer = keras.initializers.get(initializer)
        self.supports_masking = True  # pass the token mask on to `Add`

    def build(self, inputs_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.max_length, inputs_shape[-1]),
            initializer=self.initializer,
        )

    def call(self, inputs, start_index=0):
        if inputs.shape[1] is not None and inputs.shape[1] > self.max_length:
            raise ValueError(
                f"Sequence length {inputs.shape[1]} exceeds `max_length`={self.max_length}."
            )
        # Stepping past max_length is refused by `generate` before tracing.
        positions = _positions(inputs, start_index)
        table = ops.take(self.embeddings, positions, axis=0)
        return _broadcast(ops.cast(table, self.compute_dtype), inputs)

    def compute_output_shape(self, inputs_shape):
        return tuple(inputs_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "initializer": keras.initializers.serialize(self.initializer),
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class SinusoidalPositionEmbedding(keras.layers.Layer):
    """Fixed sine/cosine position embeddings (Vaswani et al.), any length.

    Args:
        max_wavelength: Longest wavelength of the sinusoids.

    Call arguments:
        inputs: `(B, T, dim)` tensor with an even `dim`; only its shape is used.
        start_index: Position of the first token (an int or scalar tensor).

    Example:

    >>> x = keras.random.normal((2, 5, 8))
    >>> SinusoidalPositionEmbedding()(x, start_index=3).shape
    TensorShape([2, 5, 8])
    """

    def __init__(self, max_wavelength: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = float(max_wavelength)
        self.supports_masking = True

    def build(self, inputs_shape):
        if inputs_shape[-1] is None or inputs_shape[-1] % 2:
            raise ValueError(
                f"`inputs` feature dim must be even for sinusoids; received {inputs_shape[-1]}."
            )

    def call(self, inputs, start_index=0):
        dim = inputs.shape[-1]
        positions = ops.expand_dims(ops.cast(_positions(inputs, start_index), "float32"), 1)
        exponents = ops.arange(dim // 2, dtype="float32") * (2.0 / dim)
        angles = positions * ops.exp(-math.log(self.max_wavelength) * exponents)
        table = ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1)
        return _broadcast(ops.cast(ops.reshape(table, (-1, dim)), self.compute_dtype), inputs)

    def compute_output_shape(self, inputs_shape):
        return tuple(inputs_shape)

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}
