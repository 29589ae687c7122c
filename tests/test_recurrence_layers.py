"""`CausalLinearAttention(recurrence=...)` for the decayed, gated and delta
recurrences, against a float64 forward pass built from the layer's weights
and the token-by-token references in `reference.py`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode
from reference import delta_recurrence, gated_recurrence

import keras_linear_attention as kla
from keras_linear_attention.layers._recurrence import retention_log_decay

RECURRENCES = ["retention", "gated", "delta", "gated_delta"]
HEADS, KEY_DIM, DIM = 2, 4, 8


def _layer(recurrence, **kwargs):
    keras.utils.set_random_seed(1)
    layer = kla.CausalLinearAttention(HEADS, KEY_DIM, recurrence=recurrence, **kwargs)
    layer.build((None, None, DIM))
    return layer


def _x(rng, batch=2, length=13):
    return rng.normal(size=(batch, length, DIM)).astype("float32")


NAMES = ("query", "key", "value")


def _conv(a, kernel, keep=None):
    """silu of the causal depthwise convolution over each row's real tokens
    (kernel[-1] weighs the current one); padded positions get 0."""
    out = np.zeros_like(a)
    for b in range(a.shape[0]):
        real = np.flatnonzero(np.ones(a.shape[1]) if keep is None else keep[b])
        seq = np.concatenate([np.zeros((len(kernel) - 1, *a.shape[2:])), a[b, real]])
        conv = sum(kernel[j] * seq[j : j + len(real)] for j in range(len(kernel)))
        out[b, real] = conv / (1 + np.exp(-conv))
    return out


def _reference(layer, x, keep=None):
    """The layer's forward pass in float64 NumPy: projections, unit q and k,
    gates, the token-by-token recurrence, per-head RMS norm, output."""
    w = {v.path.split("/", 1)[1]: np.asarray(v.numpy(), np.float64) for v in layer.weights}
    x = np.asarray(x, np.float64)
    proj = lambda n: np.einsum("btd,dhk->bthk", x, w[f"{n}/kernel"]) + w[f"{n}/bias"]
    unit = lambda a: a / np.sqrt(np.sum(a**2, -1, keepdims=True) + 1e-12)
    q, k, v = proj("query"), proj("key"), proj("value")
    if layer.conv_size:
        q, k, v = (
            _conv(a, w[f"{n}_conv/kernel"], keep) for a, n in zip((q, k, v), NAMES, strict=True)
        )
    q, k = unit(q), unit(k)
    per_head = lambda n: np.einsum("btd,dh->bth", x, w[f"{n}/kernel"]) + w[f"{n}/bias"]
    gate = np.zeros(q.shape[:3])
    if layer.recurrence == "retention":
        gate = gate + retention_log_decay(HEADS)
    elif "gated" in layer.recurrence:
        gate = -np.logaddexp(0, per_head("decay"))
    if keep is not None:  # padded tokens: no key, no decay, no write
        k, v, gate = k * keep[..., None, None], v * keep[..., None, None], gate * keep[..., None]
    if "delta" in layer.recurrence:
        beta = 1 / (1 + np.exp(-per_head("beta")))
        beta = beta if keep is None else beta * keep[..., None]
        o, s = delta_recurrence(q, k, v, beta, gate)
    else:
        o, s = gated_recurrence(q, k, v, gate)
    o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + 1e-6) * w["output_norm/scale"]
    out = np.einsum("bthk,hkd->btd", o, w["attention_output/kernel"]) + w["attention_output/bias"]
    return out, s


def _conv_layer(recurrence, conv_size):
    """A layer, with its convolution kernels (if any) moved off the identity."""
    layer = _layer(recurrence, chunk_size=4, conv_size=conv_size)
    for name in NAMES if conv_size else ():
        conv = layer._convs[NAMES.index(name)]
        conv.kernel.assign(np.random.default_rng(7).normal(size=conv.kernel.shape))
    return layer


@pytest.mark.parametrize("conv_size", [None, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_layer_matches_the_float64_recurrence(rng, recurrence, mode, conv_size):
    layer = _conv_layer(recurrence, conv_size)
    x = _x(rng)
    out, (state, *_) = in_mode(lambda x: layer(x, return_state=True), mode)(x)
    ref_out, ref_state = _reference(layer, x)
    assert_close(f"layer {recurrence} out", out, ref_out, rtol=1e-4, atol=1e-4)
    assert_close(f"layer {recurrence} state", state, ref_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv_size", [None, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_prefill_then_step_equals_parallel(rng, recurrence, mode, conv_size):
    layer = _conv_layer(recurrence, conv_size)
    x = _x(rng, length=11)
    full = layer(x)
    call = in_mode(lambda x, s: layer(x, initial_state=s, return_state=True), mode)
    outs, state = [], layer.get_initial_state(2)
    out, state = call(x[:, :6], state)
    outs.append(out)
    for t in range(6, 11):
        out, state = call(x[:, t : t + 1], state)
        outs.append(out)
    assert_close(f"{recurrence} prefill+step", np.concatenate(outs, 1), full, 1e-5, 1e-5)


@pytest.mark.parametrize("conv_size", [None, 3])
@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_padded_tokens_change_neither_state_nor_outputs(rng, recurrence, conv_size):
    """Padding anywhere (left, middle, right) leaves the state, the convolution
    windows and the real tokens' outputs as if it were not there."""
    layer = _conv_layer(recurrence, conv_size)
    x = _x(rng, batch=1, length=9)
    keep = np.array([[0, 1, 0, 1, 1, 0, 0, 1, 0]], bool)
    out, state = layer(x, padding_mask=keep, return_state=True)
    ref_out, ref_state = _reference(layer, x, keep.astype(float))
    real = keep[0]
    assert_close(f"{recurrence} padded", np.asarray(out)[:, real], ref_out[:, real], 1e-4, 1e-4)
    assert_close(f"{recurrence} padded state", state[0], ref_state, 1e-4, 1e-5)
    alone, alone_state = layer(x[:, real], return_state=True)
    np.testing.assert_allclose(np.asarray(out)[:, real], alone, atol=1e-5)
    for a, b in zip(state, alone_state, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_gradients_match_the_float64_recurrence(rng, recurrence):
    layer = _layer(recurrence, chunk_size=4)
    x = tf.constant(_x(rng, length=9))
    weights = np.random.default_rng(1).normal(size=(2, 9, DIM))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * weights)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    eps = 1e-3  # central differences of the float64 reference, on x only
    x64 = np.asarray(x, np.float64)
    probe = [(0, 0, 0), (1, 4, 3), (0, 8, 7), (1, 2, 5)]
    for b, t, d in probe:
        up, down = x64.copy(), x64.copy()
        up[b, t, d] += eps
        down[b, t, d] -= eps
        numeric = (
            np.sum(_reference(layer, up)[0] * weights)
            - np.sum(_reference(layer, down)[0] * weights)
        ) / (2 * eps)
        assert_close(
            f"{recurrence} dx (finite differences)", grads[0][b, t, d], numeric, 1e-3, 1e-3
        )
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_config_and_keras_file_round_trip(rng, recurrence, tmp_path):
    layer = _layer(recurrence, use_gate=True, conv_size=4)
    clone = kla.CausalLinearAttention.from_config(layer.get_config())
    assert clone.recurrence == recurrence and clone.output_norm and clone.conv_size == 4
    model = keras.Sequential([keras.Input((7, DIM)), layer])
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    x = _x(rng, length=7)
    np.testing.assert_array_equal(again(x), model(x))


def test_new_weights_come_after_the_multi_head_attention_ones():
    """`query`, `key`, `value`, `attention_output` first, as in Keras MHA, so
    a softmax layer's weights still map onto them; new sublayers after."""
    names = [w.path.split("/", 1)[1] for w in _layer("gated_delta").weights]
    assert names[:8] == [
        f"{n}/{p}"
        for n in ("query", "key", "value", "attention_output")
        for p in ("kernel", "bias")
    ]
    assert names[8:] == [
        "decay/kernel",
        "decay/bias",
        "beta/kernel",
        "beta/bias",
        "output_norm/scale",
    ]
    assert len(_layer("retention").weights) == 9  # only the output norm's scale is new


def test_gates_start_at_retention_decays():
    layer = _layer("gated")
    np.testing.assert_allclose(
        -np.logaddexp(0, layer.get_weights()[-2]), retention_log_decay(HEADS), rtol=1e-6
    )


def test_mixed_precision_long_sequence_stays_finite():
    keras.config.set_dtype_policy("mixed_float16")
    layer = kla.CausalLinearAttention(2, 16, recurrence="gated_delta")
    x = np.random.default_rng(0).normal(size=(1, 8192, 32)).astype("float16") * 4
    out, (state,) = layer(x, return_state=True)
    assert out.dtype == "float16" and state.dtype == "float32"
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(state))


def test_feature_map_is_refused_for_the_new_recurrences():
    with pytest.raises(ValueError, match="`feature_map` applies to recurrence='linear' only"):
        kla.CausalLinearAttention(2, 4, recurrence="delta", feature_map="relu")
    with pytest.raises(ValueError, match="`recurrence` must be one of"):
        kla.CausalLinearAttention(2, 4, recurrence="mamba")
    with pytest.raises(ValueError, match="`conv_size` applies to the recurrences other than"):
        kla.CausalLinearAttention(2, 4, conv_size=4)
    with pytest.raises(ValueError, match="`conv_size` must be a positive integer"):
        kla.CausalLinearAttention(2, 4, recurrence="delta", conv_size=0)


def test_short_convolution_skips_padding_and_carries_its_window(rng):
    conv = kla.ShortConvolution(3)
    x = rng.normal(size=(2, 7, 2, 3)).astype("float32")
    conv.build(x.shape)
    conv.kernel.assign(rng.normal(size=(3, 2, 3)))
    keep = np.array([[1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 0]], bool)
    out, window = conv(x, keep=keep)
    expected = _conv(x.astype(float), np.asarray(conv.kernel, float), keep)
    np.testing.assert_allclose(np.asarray(out)[keep], expected[keep], rtol=1e-5, atol=1e-6)
    # The window is the last two real tokens; continuing from it is exact.
    tail = np.stack([x[b, np.flatnonzero(keep[b])[-2:]] for b in range(2)])
    np.testing.assert_array_equal(window, tail)
    full, _ = conv(x[:1, :5])
    first, w = conv(x[:1, :3])
    rest, _ = conv(x[:1, 3:5], window=w)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), full, rtol=1e-6)


@pytest.mark.parametrize("recurrence", ["gated", "gated_delta"])
def test_lm_with_convolution_fits_under_xla_and_generates(recurrence):
    keras.utils.set_random_seed(0)
    model = kla.build_causal_lm(
        13, sequence_length=32, hidden_dim=16, num_heads=2, attention=recurrence, conv_size=4
    )
    tokens = np.tile(np.arange(13), (16, 3))[:, :25] % 13
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    history = model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=8, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    prompts = tokens[:2, :4].astype("int32")
    seq = prompts
    for _ in range(5):
        nxt = np.asarray(model(seq))[:, -1].argmax(-1)[:, None].astype("int32")
        seq = np.concatenate([seq, nxt], 1)
    np.testing.assert_array_equal(kla.generate(model, prompts, 5), seq)
