"""`build_causal_lm`: token embedding + causal decoder stack + LM head."""

from __future__ import annotations

import keras

from keras_linear_attention.blocks.linear_transformer_decoder import LinearTransformerDecoder
from keras_linear_attention.models import _embedding


def build_causal_lm(
    vocabulary_size: int,
    *,
    sequence_length: int | None = None,
    hidden_dim: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_dim: int | None = None,
    dropout: float = 0.0,
    feature_map="elu",
    attention: str = "linear",
    position: str = "learned",
    conv_size: int | None = None,
    dtype=None,
    name: str = "linear_transformer_lm",
) -> keras.Model:
    """A functional causal language model: token ids `(B, N)` → logits `(B, N, V)`.

    Position i's logits predict token i+1 from tokens ≤ i. With any
    attention but `"softmax"` the model is also an RNN: `keras_linear_attention.
    generation.RecurrentLM(model)` prefills a prompt in parallel and then
    steps one token at a time with a constant-size state (see `generate`).
    Layer names (`token_embedding`, `position_embedding`, `decoder_i`,
    `final_norm`, `lm_head`) are what the recurrent runner looks up.

    Args:
        vocabulary_size: Number of token ids.
        sequence_length: Longest sequence; needed by `position="learned"`.
        hidden_dim: Model width.
        num_layers: Number of decoder blocks.
        num_heads: Attention heads per block.
        intermediate_dim: Feed-forward width (default `4 * hidden_dim`).
        dropout: Dropout rate.
        feature_map: φ of linear attention.
        attention: `"linear"`, a recurrence (`"retention"`, `"gated"`,
            `"delta"`, `"gated_delta"`: see `CausalLinearAttention`), or
            `"softmax"` for the same model with Keras MHA.
        position: `"learned"`, `"sinusoidal"` or `"none"`.
        conv_size: Short convolution on q, k, v (recurrences other than
            "linear" only; see `CausalLinearAttention`).
        dtype: Dtype policy of every layer but `lm_head`, e.g.
            `"mixed_bfloat16"`; default: the global policy. The logits are
            always float32.
        name: Model name.

    Example:

    >>> model = build_causal_lm(50, sequence_length=32, hidden_dim=16, num_heads=2)
    >>> model(keras.ops.zeros((2, 7), "int32")).shape
    TensorShape([2, 7, 50])
    """
    _embedding.check_sizes(
        vocabulary_size=vocabulary_size,
        hidden_dim=hidden_dim,
        num_layers=num_layers,
        sequence_length=sequence_length,
    )
    positions = _embedding.position_layer(position, sequence_length, dtype)
    inputs = keras.Input((None,), dtype="int32", name="token_ids")
    x = _embedding.token_embedding(vocabulary_size, hidden_dim, position, dtype=dtype)(inputs)
    x = _embedding.embed(x, positions, dtype)
    x = keras.layers.Dropout(dropout, name="embedding_dropout", dtype=dtype)(x)
    for i in range(num_layers):
        x = LinearTransformerDecoder(
            intermediate_dim=intermediate_dim or 4 * hidden_dim,
            num_heads=num_heads,
            dropout=dropout,
            attention=attention,
            feature_map=feature_map,
            conv_size=conv_size,
            name=f"decoder_{i}",
            dtype=dtype,
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm", dtype=dtype)(x)
    logits = keras.layers.Dense(vocabulary_size, name="lm_head", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
