"""Learned and sinusoidal position embeddings with a start offset for stepping."""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.ops._common import poison_on_failure

PACKAGE = "keras_linear_attention"


def _positions(inputs, start_index):
    """Integer positions `start_index + [0, T)` for `(B, T, ...)` inputs."""
    length = ops.shape(inputs)[1]
    return ops.arange(length, dtype="int32") + ops.cast(start_index, "int32")


def _range_validity(inputs, start_index, sequence_length: int | None) -> Any:
    """Refuse positions `start_index + [0, T)` outside `[0, sequence_length)`.

    A Python int with a known `T` is checked now; otherwise (a tensor index,
    as in `step`) at run time, since a bad index would otherwise wrap round
    (negative) or fail deep in a gather. Returns None or the 1.0/NaN validity multiplier
    of `_checks.assert_at_runtime` for the output (XLA drops the assertion).
    """
    length, limit = inputs.shape[1], "inf" if sequence_length is None else sequence_length
    if isinstance(start_index, numbers.Integral) and (
        length is not None or sequence_length is None
    ):
        end = start_index + (length or 0)
        if start_index < 0 or (sequence_length is not None and end > sequence_length):
            raise ValueError(
                f"`start_index`={start_index} with sequence length {length}: positions "
                f"must lie in [0, {limit}) (sequence_length={sequence_length})."
            )
        return None
    start = ops.cast(start_index, "int32")
    ok = start >= 0
    if sequence_length is not None:
        ok = ops.logical_and(ok, start + ops.shape(inputs)[1] <= sequence_length)
    return _checks.assert_at_runtime(
        ok,
        f"Position index out of range: `start_index` + [0, sequence length) must lie "
        f"in [0, {limit}) (sequence_length={sequence_length}).",
    )


def _broadcast(table, inputs):
    """`(T, dim)` → `(B, T, dim)` like `inputs`, so merge layers see equal ranks."""
    return ops.broadcast_to(ops.expand_dims(table, 0), ops.shape(inputs))


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute position embeddings, shaped like the inputs.

    Args:
        sequence_length: Longest sequence (prompt plus generated tokens).
        initializer: Initializer of the `(sequence_length, dim)` table.

    Call arguments:
        inputs: `(B, T, dim)` tensor; only its shape is used.
        start_index: Position of the first token (an int or scalar tensor);
            non-zero when stepping through a sequence one token at a time.
            Positions outside `[0, sequence_length)` raise (NaN output under XLA).

    Example:

    >>> x = keras.random.normal((2, 5, 8))
    >>> (x + PositionEmbedding(sequence_length=16)(x)).shape
    TensorShape([2, 5, 8])
    """

    def __init__(self, sequence_length: int, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        _checks.check_positive_int("sequence_length", sequence_length)
        self.sequence_length = sequence_length
        self.initializer = keras.initializers.get(initializer)
        self.supports_masking = True  # pass the token mask on to `Add`

    def build(self, inputs_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.sequence_length, inputs_shape[-1]),
            initializer=self.initializer,
        )

    def call(self, inputs, start_index=0):
        if inputs.shape[1] is not None and inputs.shape[1] > self.sequence_length:
            raise ValueError(
                f"Input length {inputs.shape[1]} exceeds `sequence_length`={self.sequence_length}."
            )
        validity = _range_validity(inputs, start_index, self.sequence_length)
        # Clipped so that a bad index reaches the check, not a gather error.
        positions = ops.clip(_positions(inputs, start_index), 0, self.sequence_length - 1)
        table = poison_on_failure(ops.take(self.embeddings, positions, axis=0), validity)
        return _broadcast(ops.cast(table, self.compute_dtype), inputs)

    def compute_output_shape(self, inputs_shape):
        return tuple(inputs_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "sequence_length": self.sequence_length,
            "initializer": keras.initializers.serialize(self.initializer),
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class SinusoidalPositionEmbedding(keras.layers.Layer):
    """Fixed sine/cosine position embeddings (Vaswani et al.), any length.

    Args:
        max_wavelength: Longest wavelength of the sinusoids.

    Call arguments:
        inputs: `(B, T, dim)` tensor with an even `dim`; only its shape is used.
        start_index: Position of the first token (an int or scalar tensor),
            >= 0.

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
        validity = _range_validity(inputs, start_index, None)
        positions = ops.expand_dims(ops.cast(_positions(inputs, start_index), "float32"), 1)
        exponents = ops.arange(dim // 2, dtype="float32") * (2.0 / dim)
        angles = positions * ops.exp(-math.log(self.max_wavelength) * exponents)
        table = poison_on_failure(ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1), validity)
        return _broadcast(ops.cast(ops.reshape(table, (-1, dim)), self.compute_dtype), inputs)

    def compute_output_shape(self, inputs_shape):
        return tuple(inputs_shape)

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}
