"""`build_sequence_classifier`: encoder stack + pooling + softmax head."""

from __future__ import annotations

import keras

from keras_linear_attention.blocks.linear_transformer_encoder import LinearTransformerEncoder
from keras_linear_attention.models import _embedding


def build_sequence_classifier(
    num_classes: int,
    *,
    feature_dim: int | None = None,
    vocabulary_size: int | None = None,
    sequence_length: int | None = None,
    hidden_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_dim: int | None = None,
    dropout: float = 0.1,
    feature_map="elu",
    attention: str = "linear",
    position: str = "learned",
    normalize_first: bool = True,
    dtype=None,
    name: str = "linear_transformer_classifier",
) -> keras.Model:
    """A functional Transformer classifier over variable-length sequences.

    Inputs are either float feature vectors `(B, N, feature_dim)` (patches,
    audio frames, ...) or integer token ids `(B, N)` with 0 as padding
    (`vocabulary_size`); padded tokens are masked out of attention and pooling.
    The model returns logits `(B, num_classes)`.

    Args:
        num_classes: Number of output classes.
        feature_dim: Size of float input vectors (exclusive with `vocabulary_size`).
        vocabulary_size: Token vocabulary size, id 0 reserved for padding.
        sequence_length: Longest sequence; needed by `position="learned"`.
        hidden_dim: Model width.
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        intermediate_dim: Feed-forward width (default `2 * hidden_dim`).
        dropout: Dropout rate in the blocks.
        feature_map: φ of linear attention.
        attention: `"linear"` or `"softmax"` (same model with Keras MHA).
        position: `"learned"`, `"sinusoidal"`, `"rotary"` (rotary embeddings
            inside each linear attention, RoFormer's form; no length limit)
            or `"none"`.
        normalize_first: Pre-norm blocks.
        dtype: Dtype policy of every layer but the `logits` head, e.g.
            `"mixed_bfloat16"`; default: the global policy. The logits are
            always float32.
        name: Model name.

    Example:

    >>> model = build_sequence_classifier(10, feature_dim=16, sequence_length=49)
    >>> model(keras.random.normal((2, 49, 16))).shape
    TensorShape([2, 10])
    """
    _embedding.check_sizes(
        num_classes=num_classes,
        hidden_dim=hidden_dim,
        num_layers=num_layers,
        feature_dim=feature_dim,
        vocabulary_size=vocabulary_size,
        sequence_length=sequence_length,
    )
    if (feature_dim is None) == (vocabulary_size is None):
        raise ValueError("Pass exactly one of `feature_dim` or `vocabulary_size`.")
    positions = _embedding.position_layer(position, sequence_length, dtype)
    rotary_max_wavelength = _embedding.rotary_max_wavelength(position, attention)
    if vocabulary_size is not None:
        inputs = keras.Input((None,), dtype="int32", name="token_ids")
        embedding = _embedding.token_embedding(
            vocabulary_size, hidden_dim, position, mask_zero=True, dtype=dtype
        )
        x = embedding(inputs)
    else:
        inputs = keras.Input((None, feature_dim), name="features")
        x = keras.layers.Dense(hidden_dim, name="input_projection", dtype=dtype)(inputs)
    x = _embedding.embed(x, positions, dtype)
    x = keras.layers.Dropout(dropout, name="embedding_dropout", dtype=dtype)(x)
    for i in range(num_layers):
        x = LinearTransformerEncoder(
            intermediate_dim=intermediate_dim or 2 * hidden_dim,
            num_heads=num_heads,
            dropout=dropout,
            attention=attention,
            feature_map=feature_map,
            normalize_first=normalize_first,
            rotary_max_wavelength=rotary_max_wavelength,
            name=f"encoder_{i}",
            dtype=dtype,
        )(x)
    if normalize_first:
        x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm", dtype=dtype)(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool", dtype=dtype)(x)
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
