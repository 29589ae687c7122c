"""Run exported SavedModel / TFLite signatures and compare them with Keras."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_linear_attention.export import signatures


def sample_inputs(model: keras.Model, batch: int = 2, length: int = 16, seed: int = 0):
    """Random valid inputs for the model's `serve` signature."""
    spec = signatures.serve_spec(model)
    rng = np.random.default_rng(seed)
    if spec.dtype.is_integer:
        vocab = model.get_layer("token_embedding").input_dim
        return rng.integers(1, vocab, size=(batch, length)).astype(spec.dtype.as_numpy_dtype)
    shape = (batch, length, *spec.shape[2:])
    return rng.random(shape, dtype=np.float32)


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _run_stream(call_prefill, call_step, x):
    """Prefill all but the last token, then step it; return the step's logits."""
    out = call_prefill(x[:, :-1])
    states = {k: v for k, v in out.items() if k != "logits"}
    index = np.asarray(x.shape[1] - 1, np.int32)
    return call_step(x[:, -1], index, states)["logits"]


def saved_model_errors(model: keras.Model, path: str, x) -> dict:
    """Max abs error of each SavedModel signature against Keras on `x`."""
    loaded = tf.saved_model.load(path)
    expected = np.asarray(model(x, training=False))
    errors = {"serve": _max_err(loaded.signatures["serve"](tf.constant(x))["logits"], expected)}
    if "step" in loaded.signatures:
        sigs = loaded.signatures
        prefill = lambda t: sigs["prefill"](token_ids=tf.constant(t))
        step = lambda t, i, s: sigs["step"](token=tf.constant(t), index=tf.constant(i), **s)
        errors["prefill+step"] = _max_err(_run_stream(prefill, step, x), expected[:, -1])
    return errors


def tflite_runner(flatbuffer: bytes):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=flatbuffer)


def _only_runner(flatbuffer: bytes):
    interpreter = tflite_runner(flatbuffer)
    (name,) = interpreter.get_signature_list()
    return interpreter.get_signature_runner(name), interpreter.get_signature_list()[name]


def tflite_serve_error(model: keras.Model, flatbuffer: bytes, x) -> float:
    """Max abs error of a `serve` TFLite file against Keras on `x` (resized at run time)."""
    runner, io = _only_runner(flatbuffer)
    (input_name,) = io["inputs"]
    return _max_err(runner(**{input_name: x})["logits"], model(x, training=False))


def tflite_step_error(model: keras.Model, flatbuffer: bytes, x) -> float:
    """Feed `x` token by token through a `step` TFLite file from zero states, as a
    device would, and compare every position's logits with the parallel Keras model."""
    runner, io = _only_runner(flatbuffer)
    runner_lm = signatures.recurrent_or_none(model)
    template = runner_lm.get_initial_state(x.shape[0])
    names = signatures.state_names(runner_lm)
    states = {k: np.asarray(t) for k, t in zip(names, template, strict=True)}
    logits = []
    for i in range(x.shape[1]):
        out = runner(token=x[:, i], index=np.asarray(i, np.int32), **states)
        logits.append(out.pop("logits"))
        states = out
    return _max_err(np.stack(logits, axis=1), model(x, training=False))
