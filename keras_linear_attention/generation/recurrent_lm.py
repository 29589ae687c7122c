"""`RecurrentLM`: a causal linear LM run as an RNN (prefill, then step)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.models.causal_lm import CausalLMParts, causal_lm_forward


def _compiled(fn, jit_compile: bool):
    """A `tf.function` (XLA with `jit_compile`) on TensorFlow. Other backends
    run eagerly: `jax.jit` would freeze the weights it closes over into the
    trace, so a model trained further would generate with stale weights."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, jit_compile=jit_compile)


def _int32(name: str, x: Any) -> Any:
    """`x` as an int32 tensor; refuses floats rather than truncate them."""
    x = ops.convert_to_tensor(x)
    if "int" not in _checks.dtype_name(x):
        raise TypeError(f"`{name}` must hold integers; received dtype {_checks.dtype_name(x)}.")
    return ops.cast(x, "int32")


class RecurrentLM:
    """Runs a model from `build_causal_lm` as an RNN over its decoder states.

    It runs the model's own layers through `causal_lm_forward`, the function
    that built the model, with states: there is no second copy of the stack.

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
    >>> lm = RecurrentLM(build_causal_lm(20, sequence_length=16, hidden_dim=8, num_heads=2))
    >>> logits, states = lm.prefill([[1, 2, 3]])
    >>> logits, states = lm.step([4], states, 3)
    >>> tuple(logits.shape)
    (1, 20)
    """

    def __init__(self, model: keras.Model, jit_compile: bool = True):
        self.model = model
        self.parts = CausalLMParts.of(model)
        self._check_decoders()
        # Called with tensors only (see `prefill`/`step`): a Python int index
        # would retrace, and under XLA recompile, for every position.
        self._prefill_fn = _compiled(self.prefill_graph, jit_compile)
        self._step_fn = _compiled(self.step_graph, jit_compile)

    @property
    def decoders(self) -> tuple:
        return self.parts.decoders

    def _check_decoders(self) -> None:
        for block in self.decoders:
            if block.attention == "softmax" or block.has_cross_attention:
                raise ValueError(
                    f"Block {block.name!r} cannot run as an RNN: recurrent generation "
                    "needs a linear attention (not 'softmax') and no cross-attention."
                )

    @property
    def sequence_length(self) -> int | None:
        return getattr(self.parts.position_embedding, "sequence_length", None)

    @property
    def vocabulary_size(self) -> int:
        """Token ids must lie in `[0, vocabulary_size)`."""
        return self.parts.token_embedding.input_dim

    def prefill(self, tokens) -> tuple:
        """Last-position logits `(B, V)` and the states after the `(B, P)` `tokens`."""
        return self._prefill_fn(_int32("tokens", tokens))

    def step(self, token, states, index) -> tuple:
        """Logits `(B, V)` and new states after one token per sequence at `index`
        (any int or scalar tensor: it is passed as a tensor, so never retraces)."""
        index = _int32("index", index)
        self._check_index(index)
        return self._step_fn(_int32("token", token), tuple(states), index)

    def _check_index(self, index) -> None:
        """A concrete index is checked here; a traced one by the position layer."""
        if len(index.shape) != 0:
            raise ValueError(f"`index` must be a scalar; received shape {tuple(index.shape)}.")
        if not _checks.is_concrete(index):
            return
        limit = self.sequence_length
        if int(index) < 0 or (limit is not None and int(index) >= limit):
            raise ValueError(
                f"`index` must lie in [0, {limit or 'inf'}) (sequence_length={limit}); "
                f"received {int(index)}."
            )

    def get_initial_state(self, batch_size: Any) -> tuple:
        """Zero states for `batch_size` sequences, flat: `(kv_0, k_sum_0, kv_1, ...)`
        (one `state_i` per block for the recurrences other than "linear")."""
        return tuple(t for block in self.decoders for t in block.get_initial_state(batch_size))

    @property
    def state_names(self) -> list[str]:
        """Names of the flat states, e.g. `["kv_0", "k_sum_0", "state_1"]`."""
        return [
            f"{name}_{i}"
            for i, block in enumerate(self.decoders)
            for name in block.self_attention.state_names
        ]

    def run(self, tokens, states: tuple, start_index) -> tuple:
        """Logits `(B, T, V)` for `tokens` continuing from `states` at `start_index`."""
        names = self.state_names
        if len(states) != len(names):
            raise ValueError(
                f"`states` must hold {len(names)} tensors ({', '.join(names)}); "
                f"received {len(states)}."
            )
        return causal_lm_forward(self.parts, tokens, tuple(states), start_index, training=False)

    def prefill_graph(self, tokens) -> tuple:
        """`prefill` without conversion, checks or compilation: for tracing
        into other graphs (the exported `prefill` signature)."""
        states = self.get_initial_state(ops.shape(tokens)[0])
        logits, states = self.run(tokens, states, 0)
        return logits[:, -1], states

    def step_graph(self, token, states, index) -> tuple:
        """`step` without conversion, checks or compilation (see `prefill_graph`)."""
        logits, states = self.run(token[:, None], states, index)
        return logits[:, 0], states
