import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# On AMX-capable Xeons inside sandboxes that do not grant AMX state, oneDNN's
# bfloat16 matmul dies with SIGILL (measured: TF 2.21, this machine kind).
# Capping oneDNN just below AMX avoids it (a lower cap, AVX512_CORE_BF16,
# segfaults float16 matmuls instead); see README "Numerics".
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_MAX_ERRORS: dict = {}


def record_error(name: str, err: float) -> None:
    """Keep the largest error seen per kind of comparison for the summary."""
    _MAX_ERRORS[name] = max(_MAX_ERRORS.get(name, 0.0), float(err))


def assert_close(name, actual, expected, rtol, atol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    err = np.max(np.abs(actual - expected)) if actual.size else 0.0
    record_error(name, err)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def pytest_terminal_summary(terminalreporter):
    if not _MAX_ERRORS:
        return
    terminalreporter.section("max abs error against the float64 reference")
    for name in sorted(_MAX_ERRORS):
        terminalreporter.write_line(f"{name:<48} {_MAX_ERRORS[name]:.3e}")


MODES = ["eager", "function", "xla"]


def in_mode(fn, mode):
    """Run `fn` eagerly, as a tf.function, or XLA-compiled."""
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "xla"), reduce_retracing=False)


def prefill_then_steps(layer, x, prompt, mode):
    """A causal `layer` on `x[:, :prompt]` from its initial state, then one
    position per call with the state carried (`mode` as in `in_mode`).
    Returns the outputs concatenated along the sequence, the state the
    prompt left and the final state."""
    call = in_mode(lambda x, state: layer(x, initial_state=state, return_state=True), mode)
    out, prompt_state = call(x[:, :prompt], layer.get_initial_state(x.shape[0]))
    outs, state = [out], prompt_state
    for t in range(prompt, x.shape[1]):
        out, state = call(x[:, t : t + 1], state)
        outs.append(out)
    return tf.concat(outs, 1), prompt_state, state


# A GPT-2 small enough for unit tests (keras-hub's `GPT2Backbone` arguments).
TINY_GPT2 = dict(
    vocabulary_size=40,
    num_layers=2,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=16,
    max_sequence_length=24,
    dropout=0.0,
)


def weight_values(model):
    """Copies of every weight of `model`, in order."""
    return [w.numpy().copy() for w in model.weights]


def frozen_weights(linear):
    """Copies of `linear`'s weights but the Hedgehog maps' (what attention
    transfer must leave alone)."""
    return [w.numpy().copy() for w in linear.weights if "hedgehog" not in w.path]


def assert_transfer_left_alone(softmax, softmax_before, linear, frozen):
    """After `attention_transfer`: only the feature maps trained, the softmax
    model is untouched and no recording wrapper is left on its layers."""
    for a, b in zip(frozen_weights(linear), frozen, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weight_values(softmax), softmax_before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all("call" not in vars(layer) for layer in softmax._flatten_layers())


def seeded_mha(num_heads=2, key_dim=4, **kwargs):
    """A `LinearMultiHeadAttention` whose weights are seeded draws of scale
    0.5 (biases included), large enough that errors in any path show."""
    import keras

    import keras_linear_attention as kla

    kwargs.setdefault("kernel_initializer", keras.initializers.RandomNormal(0.0, 0.5, seed=1))
    kwargs.setdefault("bias_initializer", keras.initializers.RandomNormal(0.0, 0.5, seed=2))
    return kla.LinearMultiHeadAttention(num_heads=num_heads, key_dim=key_dim, **kwargs)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _reset_policy():
    import keras

    yield
    keras.config.set_dtype_policy("float32")


def _debian_data_present() -> bool:
    from keras_linear_attention.datasets import fashion_mnist

    return fashion_mnist.local_source_available()


needs_debian_data = pytest.mark.skipif(
    not _debian_data_present(),
    reason="Debian package dataset-fashion-mnist is not installed "
    "(apt-get install dataset-fashion-mnist; .ci/run does this)",
)


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """A TFDS data_dir with real Fashion-MNIST, prepared once per session."""
    from keras_linear_attention.datasets import fashion_mnist

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    assert fashion_mnist.prepare_offline(data_dir)
    return data_dir
