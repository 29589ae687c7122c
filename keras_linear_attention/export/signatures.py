"""Serving functions and their input signatures, per kind of model."""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_linear_attention.generation.recurrent_lm import RecurrentLM
from keras_linear_attention.layers import _recurrence


def serve_spec(model: keras.Model) -> tf.TensorSpec:
    """The model's single input with dynamic batch and sequence length."""
    if len(model.inputs) != 1:
        raise ValueError(
            f"Export supports single-input models; {model.name!r} has {len(model.inputs)}."
        )
    inp = model.inputs[0]
    if len(inp.shape) < 2:
        raise ValueError(f"The model input must be (batch, length, ...); received {inp.shape}.")
    shape = (None, None, *inp.shape[2:])
    return tf.TensorSpec(shape, tf.as_dtype(inp.dtype), name=inp.name.split(":")[0] or "inputs")


def recurrent_or_none(model: keras.Model) -> RecurrentLM | None:
    """A `RecurrentLM` when the model is a causal linear LM, else None."""
    try:
        return RecurrentLM(model, jit_compile=False)
    except ValueError:
        return None


def state_names(runner: RecurrentLM) -> list[str]:
    return runner.state_names


def recurrent_endpoints(names: list[str], templates: list, prefill, step) -> dict:
    """The `prefill` and `step` endpoints of any recurrent LM whose state is
    the flat tensors `names` (shaped like `templates`, batch 1).

    `prefill(token_ids)` and `step(token, index, states)` return
    `(logits, states)`; the endpoints return `{"logits", *names}`, so the
    states are named signature inputs and outputs.
    """

    def named(logits, states) -> dict:
        return {"logits": logits, **dict(zip(names, states, strict=True))}

    state_specs = [
        tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name)
        for name, t in zip(names, templates, strict=True)
    ]
    token_ids = tf.TensorSpec((None, None), tf.int32, name="token_ids")
    token = tf.TensorSpec((None,), tf.int32, name="token")
    index = tf.TensorSpec((), tf.int32, name="index")
    return {
        "prefill": (lambda ids: named(*prefill(ids)), [token_ids]),
        "step": (
            lambda tok, idx, *states: named(*step(tok, idx, states)),
            [token, index, *state_specs],
        ),
    }


def endpoints(model: keras.Model) -> dict:
    """`{name: (fn, input_signature)}`: `serve`, plus `prefill`/`step` for causal linear LMs.

    `prefill(token_ids (B, P))` → last-position logits and every block's
    state (`kv_i`, `k_sum_i`, or `state_i` for the decayed, gated and delta
    recurrences); `step(token (B,), index (), *states)` → logits and new
    states.
    """
    spec = serve_spec(model)
    result = {"serve": (lambda x: {"logits": model(x, training=False)}, [spec])}
    runner = recurrent_or_none(model)
    if runner is None:
        return result
    return {
        **result,
        **recurrent_endpoints(
            state_names(runner),
            runner.get_initial_state(1),
            runner.prefill_graph,
            lambda token, index, states: runner.step_graph(token, states, index),
        ),
    }


def tflite_limits(model: keras.Model) -> dict:
    """`{signature: reason}` for the signatures TFLite builtins cannot run.

    The delta rule passes its state from chunk to chunk through a loop whose
    per-chunk tensors have a run-time batch and length; TFLite's builtins
    need those (TensorList) shapes static. Its `step` has no loop and
    converts; `serve` (the whole sequence) does not.
    """
    runner = recurrent_or_none(model)
    if runner is None:
        return {}
    delta = [
        block.name
        for block in runner.decoders
        if getattr(block.self_attention, "recurrence", "linear") in _recurrence.DELTA
    ]
    if not delta:
        return {}
    return {
        "serve": f"blocks {delta} use the delta rule, whose chunk scan needs TensorList ops "
        "with run-time shapes (not TFLite builtins); use the SavedModel `serve`/`prefill` "
        "and the TFLite `step`."
    }
