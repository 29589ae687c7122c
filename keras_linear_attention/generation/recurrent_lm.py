"""`RecurrentLM`: a causal linear LM run as an RNN (prefill, then step)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_linear_attention.blocks.linear_transformer_decoder import LinearTransformerDecoder


def _compiled(fn, jit_compile: bool):
    """A `tf.function` (XLA with `jit_compile`) on TensorFlow. Other backends
    run eagerly: `jax.jit` would freeze the weights it closes over into the
    trace, so a model trained further would generate with stale weights."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, jit_compile=jit_compile)


def _optional_layer(model: keras.Model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


class RecurrentLM:
    """Runs a model from `build_causal_lm` as an RNN over its decoder states.

    `prefill(tokens)` runs the prompt with the parallel (chunked) algorithm and
    returns the last position's logits and every block's `(kv, k_sum)` state;
    `step(token, states, index)` feeds one token per sequence at position
    `index` and costs the same whatever the context length. On TensorFlow both
    are `tf.function`s (XLA-compiled with `jit_compile=True`), one call per
    token for the whole stack; other Keras backends run them eagerly. States
    are a flat tuple `(kv_0, k_sum_0, kv_1, ...)`, float32, so they export as
    plain tensors.

    Example:

    >>> from keras_linear_attention.models import build_causal_lm
    >>> lm = RecurrentLM(build_causal_lm(20, max_length=16, hidden_dim=8, num_heads=2))
    >>> logits, states = lm.prefill(ops.convert_to_tensor([[1, 2, 3]]))
    >>> logits, states = lm.step(ops.convert_to_tensor([4]), states, 3)
    >>> tuple(logits.shape)
    (1, 20)
    """

    def __init__(self, model: keras.Model, jit_compile: bool = True):
        self.model = model
        self.token_embedding = model.get_layer("token_embedding")
        self.position_embedding = _optional_layer(model, "position_embedding")
        self.final_norm = model.get_layer("final_norm")
        self.head = model.get_layer("lm_head")
        self.decoders = [x for x in model.layers if isinstance(x, LinearTransformerDecoder)]
        self._check_decoders()
        self.prefill = _compiled(self._prefill, jit_compile)
        self.step = _compiled(self._step, jit_compile)

    def _check_decoders(self) -> None:
        if not self.decoders:
            raise ValueError("The model has no `LinearTransformerDecoder` blocks.")
        for block in self.decoders:
            if block.attention != "linear" or block._cross_attention is not None:
                raise ValueError(
                    f"Block {block.name!r} cannot run as an RNN: recurrent generation "
                    "needs attention='linear' and no cross-attention."
                )

    @property
    def max_length(self) -> int | None:
        return getattr(self.position_embedding, "max_length", None)

    def initial_state(self, batch_size: Any) -> tuple:
        """Zero states for `batch_size` sequences: `(kv_0, k_sum_0, kv_1, ...)`."""
        return tuple(t for block in self.decoders for t in block.get_initial_state(batch_size))

    def run(self, tokens, states: tuple, start_index) -> tuple:
        """Logits `(B, T, V)` for `tokens` continuing from `states` at `start_index`."""
        if len(states) != 2 * len(self.decoders):
            raise ValueError(
                f"`states` must hold {2 * len(self.decoders)} tensors (kv, k_sum per "
                f"block, {len(self.decoders)} blocks); received {len(states)}."
            )
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(x, start_index=start_index)
        new_states = []
        for i, block in enumerate(self.decoders):
            x, (kv, k_sum) = block(
                x, initial_state=(states[2 * i], states[2 * i + 1]), return_state=True
            )
            new_states += [kv, k_sum]
        return self.head(self.final_norm(x)), tuple(new_states)

    def _prefill(self, tokens):
        states = self.initial_state(ops.shape(tokens)[0])
        logits, states = self.run(tokens, states, 0)
        return logits[:, -1], states

    def _step(self, token, states, index):
        logits, states = self.run(token[:, None], states, index)
        return logits[:, 0], states
