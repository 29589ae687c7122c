"""Backend-agnostic checks: only `keras.ops`, NumPy and the references of
`reference.py`, so they run under any Keras backend. CI runs this file a
second time with `KERAS_BACKEND=jax`; the float64 reference (TensorFlow ops,
eager, whatever the Keras backend) is the same in both runs, the gradients are
checked against its `keras.ops` twin, and one test loads a `.keras` file saved
here into the other backend and compares outputs.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops
from reference import (
    delta_recurrence_ops,
    elu_plus_one,
    kernel_attention,
    kernel_attention_ops,
    layer_reference,
)

import keras_linear_attention as kla
from keras_linear_attention.export import export_saved_model
from keras_linear_attention.generation import RecurrentLM, generate

BACKEND = keras.backend.backend()
ROOT = Path(__file__).resolve().parents[1]


def grads(fn, *args):
    """Gradient of sum(fn(*args) * w) for a fixed cotangent w, per backend."""

    def loss(*xs):
        out = fn(*xs)
        w = ops.sin(ops.reshape(ops.arange(ops.size(out), dtype=out.dtype), ops.shape(out)))
        return ops.sum(out * w)

    if BACKEND == "jax":
        import jax

        return jax.grad(loss, argnums=tuple(range(len(args))))(*args)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            value = loss(*args)
        return tape.gradient(value, args)
    if BACKEND == "torch":
        import torch

        args = [torch.tensor(np.asarray(a), requires_grad=True) for a in args]
        loss(*args).backward()
        return [a.grad for a in args]
    pytest.skip(f"no gradient helper for backend {BACKEND}")


def _qkv(rng, n, batch=2, heads=2, dim=4):
    q, k = (np.asarray(elu_plus_one(rng.normal(size=(batch, n, heads, dim)))) for _ in "qk")
    return q, k, rng.normal(size=(batch, n, heads, 3))


@pytest.mark.parametrize("threshold", [None, 0], ids=["default", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,chunk", [(1, 4), (13, 4), (70, 4), (64, 64)])
def test_ops_forward_and_gradients_match_numpy(rng, causal, n, chunk, threshold):
    q, k, v = _qkv(rng, n)
    mask = rng.random((2, n)) > 0.3
    mask[:, 0] = True

    def ours(q, k, v):
        if causal:
            return kla.causal_linear_attention(
                q, k, v, key_mask=mask, chunk_size=chunk, short_sequence_threshold=threshold
            )
        return kla.linear_attention(q, k, v, key_mask=mask, short_sequence_threshold=threshold)

    out = ops.convert_to_numpy(ours(*(x.astype("float32") for x in (q, k, v))))
    np.testing.assert_allclose(out, kernel_attention(q, k, v, mask, causal), rtol=1e-4, atol=2e-5)
    # Gradients against the explicit matrix written in keras.ops, float32 (JAX
    # runs without x64 by default, so float64 would silently be float32).
    q, k, v = (x.astype("float32") for x in (q, k, v))
    ours_grads = grads(ours, q, k, v)
    ref_grads = grads(lambda q, k, v: kernel_attention_ops(q, k, v, mask, causal), q, k, v)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        a, b = ops.convert_to_numpy(a), ops.convert_to_numpy(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_layer_matches_numpy_from_its_weights(rng, causal):
    layer = kla.LinearMultiHeadAttention(num_heads=2, key_dim=4)
    x = rng.normal(size=(2, 9, 8)).astype("float32")
    out = ops.convert_to_numpy(layer(x, x, use_causal_mask=causal))
    w = {
        v.path.split("/", 1)[1]: np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float64)
        for v in layer.weights
    }

    expected = layer_reference(w, x, x, causal=causal)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_causal_mask_given_by_value_trains_compiled_past_the_short_path(rng):
    """A dense lower-triangular mask (keras-hub's decoders pass this form)
    picks the causal path at run time through `ops.cond`. One compiled SGD
    step at a length past the short path (its chunked gradient inside the
    cond) equals the step with `use_causal_mask=True` from the same weights."""
    n, dim = 300, 8
    x = rng.normal(size=(2, n, dim)).astype("float32")
    y = rng.normal(size=(2, n, dim)).astype("float32")
    mask = np.tril(np.ones((n, n), bool))[None].repeat(2, 0)

    def compiled(by_value):
        keras.utils.set_random_seed(0)
        inputs = [keras.Input((n, dim))] + ([keras.Input((n, n), dtype="bool")] if by_value else [])
        layer = kla.LinearMultiHeadAttention(num_heads=2, key_dim=4)
        if by_value:
            out = layer(inputs[0], inputs[0], attention_mask=inputs[1])
        else:
            out = layer(inputs[0], inputs[0], use_causal_mask=True)
        model = keras.Model(inputs, out)
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
        return model

    by_value, by_flag = compiled(True), compiled(False)
    by_value.train_on_batch([x, mask], y)
    by_flag.train_on_batch(x, y)
    for a, b in zip(by_value.weights, by_flag.weights, strict=True):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), atol=1e-5)


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("n,chunk", [(1, 4), (13, 4), (40, 16)])
def test_recurrence_ops_forward_and_gradients_match(rng, delta, n, chunk):
    q, k, v = (rng.normal(size=(2, n, 2, d)).astype("float32") for d in (4, 4, 3))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    log_gate = np.log(rng.uniform(0.5, 1.0, (2, n, 2))).astype("float32")
    beta = rng.uniform(0, 1, (2, n, 2)).astype("float32")

    def ours(q, k, v, log_gate, beta):
        if delta:
            return kla.ops.delta_rule_attention(q, k, v, beta, log_gate, chunk_size=chunk)
        return kla.ops.gated_linear_attention(q, k, v, log_gate, chunk_size=chunk)

    def ref(q, k, v, log_gate, beta):
        return delta_recurrence_ops(q, k, v, beta if delta else None, log_gate)

    args = (q, k, v, log_gate, beta)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ours(*args)), ops.convert_to_numpy(ref(*args)), rtol=1e-4, atol=1e-5
    )
    for a, b in zip(grads(ours, *args), grads(ref, *args), strict=True):
        a = np.zeros(1) if a is None else ops.convert_to_numpy(a)
        b = np.zeros(1) if b is None else ops.convert_to_numpy(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kind",
    [{"attention": "retention"}, {"attention": "gated_delta"}, {"position": "rotary"}],
    ids=["retention", "gated_delta", "rotary"],
)
def test_lm_generates_as_it_recomputes(kind):
    keras.utils.set_random_seed(2)
    model = kla.build_causal_lm(19, sequence_length=32, hidden_dim=16, num_heads=2, **kind)
    prompts = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    np.testing.assert_array_equal(
        generate(model, prompts, 6), _greedy_by_recomputing(model, prompts, 6)
    )


def _greedy_by_recomputing(model, prompts, steps):
    """Greedy decoding that re-runs the parallel model on the whole prefix."""
    tokens = prompts
    for _ in range(steps):
        logits = ops.convert_to_numpy(model(tokens))[:, -1]
        tokens = np.concatenate([tokens, logits.argmax(-1)[:, None].astype(np.int32)], axis=1)
    return tokens


@pytest.fixture
def lm():
    keras.utils.set_random_seed(1)
    return kla.build_causal_lm(19, sequence_length=32, hidden_dim=16, num_heads=2, num_layers=2)


def test_fit_trains_and_save_load_round_trips(lm, tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.repeat(rng.integers(0, 19, (64, 17)), 2, axis=1)[:, :33]
    lm.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    losses = lm.fit(tokens[:, :-1], tokens[:, 1:], batch_size=16, epochs=12, verbose=0).history[
        "loss"
    ]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    lm.save(tmp_path / "lm.keras")
    again = keras.saving.load_model(tmp_path / "lm.keras")
    np.testing.assert_allclose(
        ops.convert_to_numpy(again(tokens[:4, :-1])),
        ops.convert_to_numpy(lm(tokens[:4, :-1])),
        rtol=1e-5,
        atol=1e-5,
    )


def test_greedy_generation_equals_parallel_recomputation(lm):
    prompts = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    np.testing.assert_array_equal(generate(lm, prompts, 8), _greedy_by_recomputing(lm, prompts, 8))


def test_prefill_then_steps_equals_parallel_logits(lm):
    runner = RecurrentLM(lm)
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    states = runner.get_initial_state(1)
    for i in range(tokens.shape[1]):
        logits, states = runner.step(ops.convert_to_tensor(tokens[:, i]), states, i)
    expected = ops.convert_to_numpy(lm(tokens))[:, -1]
    np.testing.assert_allclose(ops.convert_to_numpy(logits), expected, rtol=1e-4, atol=1e-5)


def test_seeded_sampling_is_reproducible(lm):
    a = generate(lm, [[1, 2]], 10, temperature=1.0, top_k=5, seed=3)
    b = generate(lm, [[1, 2]], 10, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="export works on TensorFlow")
def test_export_says_it_needs_tensorflow(lm, tmp_path):
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow"):
        export_saved_model(lm, str(tmp_path / "sm"))


OTHER = "jax" if BACKEND == "tensorflow" else "tensorflow"


@pytest.mark.skipif(importlib.util.find_spec(OTHER) is None, reason=f"{OTHER} not installed")
def test_other_backend_loads_the_file_and_gives_the_same_numbers(lm, tmp_path):
    tokens = np.random.default_rng(0).integers(0, 19, (2, 20)).astype(np.int32)
    lm.save(tmp_path / "lm.keras")
    np.save(tmp_path / "tokens.npy", tokens)
    code = (
        "import sys, numpy as np, keras; import keras_linear_attention;"
        "m = keras.saving.load_model(sys.argv[1]);"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))))"
    )
    env = {**os.environ, "KERAS_BACKEND": OTHER, "PYTHONPATH": str(ROOT)}
    paths = [str(tmp_path / name) for name in ("lm.keras", "tokens.npy", "other.npy")]
    subprocess.run([sys.executable, "-c", code, *paths], env=env, check=True, timeout=300)
    mine = ops.convert_to_numpy(lm(tokens))
    np.testing.assert_allclose(np.load(paths[2]), mine, rtol=1e-4, atol=1e-5)
