"""`build_causal_lm`: token embedding + causal decoder stack + LM head.

`causal_lm_forward` is the one definition of the stack: the functional
model is built by calling it on a symbolic input, and `RecurrentLM` calls
it on the same layers (`CausalLMParts.of(model)`) with states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras

from keras_linear_attention.blocks.linear_transformer_decoder import LinearTransformerDecoder
from keras_linear_attention.models import _embedding

# The names `build_causal_lm` gives its layers, which `CausalLMParts.of`
# looks up in a built (or loaded, or linearized) model.
LAYER_NAMES = {
    "token_embedding": "token_embedding",
    "position_embedding": "position_embedding",
    "add_positions": "add_positions",
    "embedding_dropout": "embedding_dropout",
    "final_norm": "final_norm",
    "lm_head": "lm_head",
}


class CausalLMParts(NamedTuple):
    """The layers of a `build_causal_lm` model, in the order they run."""

    token_embedding: keras.layers.Layer
    position_embedding: keras.layers.Layer | None
    add_positions: keras.layers.Layer | None
    embedding_dropout: keras.layers.Layer | None
    decoders: tuple
    final_norm: keras.layers.Layer
    lm_head: keras.layers.Layer

    @classmethod
    def of(cls, model: keras.Model) -> CausalLMParts:
        """The parts of a model built by `build_causal_lm` (also after
        saving, loading or `linearize`), found by their layer names."""
        found = {}
        for field, name in LAYER_NAMES.items():
            try:
                found[field] = model.get_layer(name)
            except ValueError:
                found[field] = None
        required = ("token_embedding", "final_norm", "lm_head")
        missing = [LAYER_NAMES[field] for field in required if found[field] is None]
        decoders = tuple(
            layer for layer in model.layers if isinstance(layer, LinearTransformerDecoder)
        )
        if missing or not decoders:
            missing += [] if decoders else ["decoder_<i> (LinearTransformerDecoder)"]
            raise ValueError(
                f"Model {model.name!r} is not a `build_causal_lm` model: it has no layer "
                f"named {', '.join(missing)}."
            )
        return cls(decoders=decoders, **found)


def causal_lm_forward(
    parts: CausalLMParts,
    token_ids: Any,
    states: tuple | None = None,
    start_index: Any = 0,
    training: Any = None,
) -> Any:
    """Logits `(B, T, V)` of `token_ids` `(B, T)`: the LM's forward pass.

    Without `states`, the parallel pass over whole sequences (what the
    functional model computes). With `states` (a flat tuple, each block's
    state tensors in turn: `RecurrentLM.state_names`), the tokens continue
    those states at positions `start_index + [0, T)`, and the new states
    are returned too: `(logits, new_states)`.
    """
    x = parts.token_embedding(token_ids)
    if parts.position_embedding is not None:
        positions = parts.position_embedding(x, start_index=start_index)
        x = parts.add_positions([x, positions])
    if parts.embedding_dropout is not None:
        x = parts.embedding_dropout(x, training=training)
    new_states, start = [], 0
    for block in parts.decoders:
        if states is None:
            x = block(x, training=training)
            continue
        count = len(block.self_attention.state_names)
        x, state = block(
            x,
            initial_state=tuple(states[start : start + count]),
            return_state=True,
            start_index=start_index,
            training=training,
        )
        new_states += list(state)
        start += count
    logits = parts.lm_head(parts.final_norm(x))
    return logits if states is None else (logits, tuple(new_states))


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
    The stack is `causal_lm_forward`; its layers' names (`LAYER_NAMES`,
    `decoder_i`) are how `CausalLMParts.of` finds them again.

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
        position: `"learned"`, `"sinusoidal"`, `"rotary"` (rotary embeddings
            inside each linear attention, RoFormer's form; no length limit)
            or `"none"`.
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
    rotary_max_wavelength = _embedding.rotary_max_wavelength(position, attention)
    decoders = tuple(
        LinearTransformerDecoder(
            intermediate_dim=intermediate_dim or 4 * hidden_dim,
            num_heads=num_heads,
            dropout=dropout,
            attention=attention,
            feature_map=feature_map,
            conv_size=conv_size,
            rotary_max_wavelength=rotary_max_wavelength,
            name=f"decoder_{i}",
            dtype=dtype,
        )
        for i in range(num_layers)
    )
    parts = CausalLMParts(
        token_embedding=_embedding.token_embedding(
            vocabulary_size, hidden_dim, position, dtype=dtype
        ),
        position_embedding=positions,
        add_positions=None
        if positions is None
        else keras.layers.Add(name="add_positions", dtype=dtype),
        embedding_dropout=keras.layers.Dropout(dropout, name="embedding_dropout", dtype=dtype),
        decoders=decoders,
        final_norm=keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm", dtype=dtype),
        lm_head=keras.layers.Dense(vocabulary_size, name="lm_head", dtype="float32"),
    )
    inputs = keras.Input((None,), dtype="int32", name="token_ids")
    return keras.Model(inputs, causal_lm_forward(parts, inputs), name=name)
