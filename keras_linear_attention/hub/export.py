"""SavedModel (and TFLite `step`) export of `LinearGPT2CausalLM`.

keras-hub's own export writes the parallel forward pass only; a linear LM
also deploys as an RNN, so this writes three signatures whose recurrent
states are plain tensors (`kv_i`, `k_sum_i` per block):
- `serve(token_ids, padding_mask)` → `logits` `(B, T, V)`;
- `prefill(token_ids)` → last-position `logits` `(B, V)` and the states;
- `step(token, index, *states)` → `logits` `(B, V)` and the new states.
The files load with plain `tf.saved_model.load`, without this package.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from keras_linear_attention.export.signatures import recurrent_endpoints

# Each block's state (see `LinearCachedMultiHeadAttention`).
BLOCK_STATE = ("kv", "k_sum")


def state_names(lm: keras.Model) -> list[str]:
    """`["kv_0", "k_sum_0", "kv_1", ...]`: the flat states of the signatures."""
    blocks = range(len(lm.backbone.transformer_layers))
    return [f"{name}_{i}" for i in blocks for name in BLOCK_STATE]


def _flat(cache: tuple) -> list:
    return [t for state in cache for t in state]


def _nested(lm: keras.Model, flat: tuple) -> tuple:
    """Flat states back into one `(kv, k_sum)` tuple per block."""
    size = len(BLOCK_STATE)
    return tuple(tuple(flat[i : i + size]) for i in range(0, len(flat), size))


def endpoints(lm: keras.Model) -> dict:
    """`{name: (fn, input_signature)}` for `serve`, `prefill` and `step`."""

    def serve(token_ids, padding_mask):
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        return {"logits": lm(inputs, training=False)}

    def prefill(token_ids):
        initial = lm.get_initial_state(ops.shape(token_ids)[0])
        logits, _, cache = lm.call_with_cache(token_ids, initial, 0)
        return logits[:, -1], _flat(cache)

    def step(token, index, states):
        logits, _, cache = lm.call_with_cache(token[:, None], _nested(lm, states), index)
        return logits[:, 0], _flat(cache)

    ids = tf.TensorSpec((None, None), tf.int32, name="token_ids")
    mask = tf.TensorSpec((None, None), tf.bool, name="padding_mask")
    templates = _flat(lm.get_initial_state(1))
    return {
        "serve": (serve, [ids, mask]),
        **recurrent_endpoints(state_names(lm), templates, prefill, step),
    }


def export_causal_lm(lm: keras.Model, path: str) -> list[str]:
    """Write `lm` (a `LinearGPT2CausalLM`) as a SavedModel with the
    `serve`, `prefill` and `step` signatures; returns their names. Convert
    `step` to TFLite with `kla.export.convert_to_tflite(path, "step")`.

    Example:

    >>> import tempfile
    >>> from keras_linear_attention.hub import LinearGPT2Backbone, LinearGPT2CausalLM
    >>> lm = LinearGPT2CausalLM(LinearGPT2Backbone(
    ...     vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=32))
    >>> export_causal_lm(lm, tempfile.mkdtemp())
    ['serve', 'prefill', 'step']
    """
    archive = keras.export.ExportArchive()
    archive.track(lm)
    signatures = endpoints(lm)
    for name, (fn, signature) in signatures.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(path, verbose=False)
    return list(signatures)
