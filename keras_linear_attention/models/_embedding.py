"""Input embedding shared by the model builders: tokens or features, plus positions."""

from __future__ import annotations

import keras

from keras_linear_attention import _checks
from keras_linear_attention.layers.position_embedding import (
    PositionEmbedding,
    SinusoidalPositionEmbedding,
)

POSITIONS = ("learned", "sinusoidal", "rotary", "none")
# keras-hub's (and RoFormer's) default.
ROTARY_MAX_WAVELENGTH = 10000.0


def check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        _checks.check_positive_int(name, value, allow_none=True)


def position_layer(position: str, sequence_length: int | None, dtype=None):
    if position not in POSITIONS:
        raise ValueError(f"`position` must be one of {POSITIONS}; received {position!r}.")
    if position == "learned":
        if sequence_length is None:
            raise ValueError("`position='learned'` needs `sequence_length`.")
        return PositionEmbedding(sequence_length, name="position_embedding", dtype=dtype)
    if position == "sinusoidal":
        return SinusoidalPositionEmbedding(name="position_embedding", dtype=dtype)
    return None  # "none", or "rotary": inside the attention


def rotary_max_wavelength(position: str, attention: str) -> float | None:
    """The blocks' `rotary_max_wavelength` for `position`."""
    if position != "rotary":
        return None
    if attention != "linear":
        raise ValueError(
            f"`position='rotary'` needs attention='linear'; received attention={attention!r}."
        )
    return ROTARY_MAX_WAVELENGTH


def token_embedding(
    vocabulary_size: int, hidden_dim: int, position: str, mask_zero=False, dtype=None
):
    """Token embedding; unit-scale with sinusoids, whose amplitude is 1 (Keras's
    default ±0.05 init would leave the tokens drowned by the positions)."""
    init = keras.initializers.RandomNormal(stddev=1.0) if position == "sinusoidal" else "uniform"
    return keras.layers.Embedding(
        vocabulary_size,
        hidden_dim,
        mask_zero=mask_zero,
        embeddings_initializer=init,
        name="token_embedding",
        dtype=dtype,
    )


def embed(x, position_embedding, dtype=None):  # for the sequence classifier
    """`x + positions(x)`, keeping the Keras mask of `x`."""
    if position_embedding is None:
        return x
    return keras.layers.Add(name="add_positions", dtype=dtype)([x, position_embedding(x)])
