"""The Taylor (Based) and Hedgehog feature maps against float64 references.

Every kernel value and attention output is checked against an explicit
float64 computation written here from the papers' formulas, sharing no code
with the package: Taylor against `1 + s + s²/2` itself (never its features),
Hedgehog against `[softmax(Wᵀx + b), softmax(−Wᵀx − b)]` per head.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode, prefill_then_steps
from reference import (
    hedgehog,
    kernel_layer_reference,
    layer_weights,
    np_softmax,
    taylor_kernel,
)

import keras_linear_attention as kla
from keras_linear_attention import build_causal_lm, feature_maps
from keras_linear_attention.export import (
    builtin_ops,
    convert_to_tflite,
    export_saved_model,
    parity,
)

HEADS, KEY_DIM, DIM, LENGTH, CHUNK = 2, 4, 8, 13, 4  # 13 = 3 chunks of 4 and a padded one
# Short sequences take the explicit-matrix path by default; threshold 0
# forces the chunked (causal) and global (non-causal) algorithms.
PATHS = {"short": None, "chunked": 0}


def _float64(x):
    return tf.constant(np.asarray(x, np.float64))


# ---- float64 references ---------------------------------------------------


def hedgehog_params(fm, role, values):
    """The (kernel, bias) `fm` uses for `role`, as float64 tensors from
    `values` (a float64 copy of each weight, by weight path)."""
    prefix = f"{role}_" if fm.separate_query_key else ""
    bias = getattr(fm, f"{prefix}bias")
    return values[getattr(fm, f"{prefix}kernel").path], None if bias is None else values[bias.path]


def kernel_function(fm, values):
    """The float64 kernel matrix `(q, k) -> (B, H, T, S)` of feature map `fm`."""
    if isinstance(fm, kla.TaylorFeatureMap):
        return taylor_kernel

    def kernel(q, k):
        phi_q = hedgehog(q, *hedgehog_params(fm, "query", values))
        phi_k = hedgehog(k, *hedgehog_params(fm, "key", values))
        return tf.einsum("bthf,bshf->bhts", phi_q, phi_k)

    return kernel


# ---- helpers ----------------------------------------------------------------

# A fresh `feature_map` argument per call (one φ instance per attention layer).
CONFIGS = {
    "taylor": lambda: "taylor",
    "taylor_compact": lambda: kla.TaylorFeatureMap(compact=True),
    "hedgehog": lambda: "hedgehog",
    "hedgehog_separate": lambda: kla.HedgehogFeatureMap(
        num_features=6, use_bias=True, separate_query_key=True
    ),
}


# The option variants run eagerly in the layer tests; their maps run in
# every mode in the feature-map tests.
CONFIG_MODES = [(c, m) for c in ("taylor", "hedgehog") for m in MODES] + [
    ("taylor_compact", "eager"),
    ("hedgehog_separate", "eager"),
]


def _randomize(fm, rng):
    """Hedgehog weights away from the identity (different per head)."""
    for v in fm.weights:
        v.assign(rng.normal(size=v.shape) * 0.7 + (np.eye(*v.shape[-2:]) if v.ndim == 3 else 0))


def _layers(rng, config, cls=kla.LinearMultiHeadAttention):
    """One layer per path, with the same (random) weights."""
    layers = []
    for threshold in PATHS.values():
        layer = cls(
            HEADS,
            KEY_DIM,
            feature_map=CONFIGS[config](),
            chunk_size=CHUNK,
            short_sequence_threshold=threshold,
        )
        x = tf.zeros((1, 1, DIM))
        layer(x) if cls is kla.CausalLinearAttention else layer(x, x)
        if not layers:
            _randomize(layer.feature_map, rng)
        else:
            layer.set_weights(layers[0].get_weights())
        layers.append(layer)
    return layers


def _weighted_grads(fn, x, weights, upstream):
    """`fn(x)` and the gradients of `Σ fn(x)·upstream` w.r.t. x and `weights`."""
    weights = [getattr(w, "value", w) for w in weights]  # Keras variables: their tf.Variable
    with tf.GradientTape() as tape:
        tape.watch([x, *weights])
        out = fn(x)
        loss = tf.reduce_sum(out * tf.cast(upstream, out.dtype))
    return out, tape.gradient(loss, [x, *weights])


# ---- the feature maps on their own -----------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compact", [False, True])
def test_taylor_kernel_is_second_order_exp(rng, mode, compact):
    """φ(q)·φ(k) = 1 + s + s²/2 with s = q·k/√D, and its gradients, against
    NumPy float64 (the gradient of Σ U_ij K_ij w.r.t. q_i is
    Σ_j U_ij (1 + s_ij) k_j / √D)."""
    d = 6
    q = rng.normal(size=(2, 5, HEADS, d)) * 1.5
    k = rng.normal(size=(2, 7, HEADS, d)) * 1.5
    u = rng.normal(size=(2, HEADS, 5, 7))
    fm = kla.TaylorFeatureMap(compact=compact)

    def ours(q, k):
        with tf.GradientTape() as tape:
            tape.watch([q, k])
            phi_q, phi_k = fm(q), fm(k)
            kernel = tf.einsum("bthf,bshf->bhts", phi_q, phi_k)
            loss = tf.reduce_sum(kernel * u)
        return phi_q, kernel, tape.gradient(loss, [q, k])

    phi_q, kernel, (g_q, g_k) = in_mode(ours, mode)(
        tf.constant(q, tf.float32), tf.constant(k, tf.float32)
    )
    assert phi_q.dtype == "float32"
    assert phi_q.shape[-1] == (1 + d + d * (d + 1) // 2 if compact else 1 + d + d * d)
    assert fm.output_dim(d) == phi_q.shape[-1]
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    assert_close("taylor kernel", kernel, 1 + s + s**2 / 2, 1e-5, 1e-5)
    assert np.all(np.asarray(kernel) >= 0.5 - 1e-6)  # ((1 + s)² + 1) / 2
    slope = u * (1 + s) / np.sqrt(d)
    assert_close("taylor kernel grad q", g_q, np.einsum("bhts,bshd->bthd", slope, k), 1e-5, 1e-5)
    assert_close("taylor kernel grad k", g_k, np.einsum("bhts,bthd->bshd", slope, q), 1e-5, 1e-5)


def test_hedgehog_starts_as_softmax_of_x_and_minus_x(rng):
    x = rng.normal(size=(2, 5, 3, 4)).astype("float32") * 3
    fm = feature_maps.get("hedgehog")
    assert isinstance(fm, kla.HedgehogFeatureMap)
    out = fm(x)
    assert out.shape == (2, 5, 3, 8) and out.dtype == "float32"
    x64 = x.astype(np.float64)
    expected = np.concatenate([np_softmax(x64), np_softmax(-x64)], -1)
    assert_close("hedgehog at init", out, expected, 1e-6, 1e-7)
    np.testing.assert_array_equal(fm.kernel.numpy(), np.broadcast_to(np.eye(4), (3, 4, 4)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", ["hedgehog", "hedgehog_separate"])
def test_hedgehog_matches_reference_with_random_weights(rng, mode, config):
    """Per-head W (and bias, separate query/key maps): values against NumPy,
    gradients w.r.t. x and every weight against float64 TF autodiff."""
    fm = feature_maps.get(CONFIGS[config]())
    x = rng.normal(size=(2, 5, 3, 4))
    fm.build(x.shape)
    _randomize(fm, rng)
    upstream = rng.normal(size=(2, 5, 3, fm.output_dim(4)))
    values = {v.path: _float64(v.numpy()) for v in fm.weights}
    roles = ["query", "key"] if fm.separate_query_key else [None]
    for role in roles:

        def ours(x, role=role):
            return _weighted_grads(
                lambda x: feature_maps.apply(fm, x, role or "query"), x, fm.weights, upstream
            )

        out, grads = in_mode(ours, mode)(tf.constant(x, tf.float32))
        kernel, bias = hedgehog_params(fm, role or "query", values)
        z = np.einsum("bthd,hdf->bthf", x, kernel.numpy()) + (0 if bias is None else bias.numpy())
        expected = np.concatenate([np_softmax(z), np_softmax(-z)], -1)
        assert_close(f"hedgehog {config} {role}", out, expected, 1e-6, 1e-6)
        ref_out, ref_grads = _weighted_grads(
            lambda x, kernel=kernel, bias=bias: hedgehog(x, kernel, bias),
            _float64(x),
            [kernel] + ([bias] if bias is not None else []),
            upstream,
        )
        ours_by_path = dict(zip([v.path for v in fm.weights], grads[1:], strict=True))
        used = [_path(fm, "kernel", role)] + ([_path(fm, "bias", role)] if bias is not None else [])
        assert_close(f"hedgehog {config} grad x", grads[0], ref_grads[0], 1e-5, 1e-6)
        for path, ref in zip(used, ref_grads[1:], strict=True):
            assert_close(f"hedgehog {config} grad {path}", ours_by_path[path], ref, 1e-5, 1e-6)
        for path, g in ours_by_path.items():  # the other role's map: no gradient
            if path not in used:
                assert g is None or not np.any(np.asarray(g)), path


def _path(fm, weight, role):
    return getattr(fm, f"{role}_{weight}" if fm.separate_query_key else weight).path


# ---- attention with the maps --------------------------------------------------


@pytest.mark.parametrize("config,mode", CONFIG_MODES)
def test_attention_matches_explicit_kernel_reference(rng, config, mode):
    """LinearMultiHeadAttention, non-causal (a padded key) and causal, on the
    short path and the chunked/global one, against the explicit float64
    T×S kernel matrix: outputs and gradients w.r.t. inputs and φ's weights.

    Compiled, the non-causal short path is left out: φ runs there exactly as
    on the global path (in the layer, before the attention op), and every
    extra path costs a compilation (the CI budget)."""
    layers = dict(zip(PATHS, _layers(rng, config), strict=True))
    x = rng.normal(size=(2, LENGTH, DIM))
    upstream = rng.normal(size=(2, LENGTH, DIM))
    mask = np.ones((2, LENGTH), bool)
    mask[1, -3:] = False
    runs = [(path, causal) for path in PATHS for causal in (False, True)]
    if mode != "eager":
        runs.remove(("short", False))

    def ours(x):
        results = []
        for path, causal in runs:
            layer = layers[path]
            results.append(
                _weighted_grads(
                    lambda x, layer=layer, causal=causal: layer(
                        x, x, value_mask=None if causal else mask, use_causal_mask=causal
                    ),
                    x,
                    layer.feature_map.trainable_weights,
                    upstream,
                )
            )
        return results

    results = in_mode(ours, mode)(tf.constant(x, tf.float32))
    w = layer_weights(layers["short"])
    fm = layers["short"].feature_map
    values = {v.path: _float64(v.numpy()) for v in fm.weights}
    fm_values = [values[v.path] for v in fm.trainable_weights]
    expected = {}
    for causal in (False, True):
        expected[causal] = _weighted_grads(
            lambda x, causal=causal: kernel_layer_reference(
                w, x, kernel_function(fm, values), causal, None if causal else mask
            ),
            _float64(x),
            fm_values,
            upstream,
        )
    for (path, causal), (out, grads) in zip(runs, results, strict=True):
        ref_out, ref_grads = expected[causal]
        name = f"{config} {path} causal={causal}"
        assert_close(f"attention {name}", out, ref_out, 2e-5, 2e-5)
        for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
            assert_close(f"attention grad {i} {name}", g, ref, 1e-4, 1e-5)


@pytest.mark.parametrize("config,mode", CONFIG_MODES)
def test_prefill_then_steps_equal_parallel(rng, config, mode):
    """CausalLinearAttention: a prompt prefilled with `return_state`, then one
    token at a time from that state, equals the parallel causal output, on
    both paths (the state of the short path and of the chunked one).
    Compiled, the chunked path only: `generate` below runs the short one
    compiled (and XLA-compiled in the export's step)."""
    layers = _layers(rng, config, cls=kla.CausalLinearAttention)
    x = tf.constant(rng.normal(size=(2, LENGTH, DIM)), tf.float32)
    for path, layer in zip(PATHS, layers, strict=True):
        if mode != "eager" and path == "short":
            continue
        full = layer(x)
        stepped, state, _ = prefill_then_steps(layer, x, 6, mode)
        assert state[0].shape == (2, HEADS, layer.state_shapes[0][1], KEY_DIM)
        assert_close(f"{config} {path} prefill+step", stepped, full, 1e-5, 1e-6)


def test_hedgehog_trains_with_the_model_and_reloads(rng, tmp_path):
    """`fit` moves W, per head differently; `.keras` round trip restores it."""
    inp = keras.Input((LENGTH, DIM))
    layer = kla.CausalLinearAttention(HEADS, KEY_DIM, feature_map="hedgehog")
    model = keras.Model(inp, layer(inp))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    kernel = layer.feature_map.kernel
    before = kernel.numpy()
    x = rng.normal(size=(8, LENGTH, DIM)).astype("float32")
    model.fit(x, rng.normal(size=(8, LENGTH, DIM)), batch_size=4, epochs=1, verbose=0)
    moved = kernel.numpy() - before
    assert np.all(np.abs(moved).sum(axis=(1, 2)) > 0)  # every head's W trained
    assert not np.allclose(moved[0], moved[1])  # each by its own gradient
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.layers[-1].feature_map.kernel.numpy(), kernel.numpy())
    np.testing.assert_array_equal(loaded(x), model(x))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_config_round_trip(rng, config):
    fm = feature_maps.get(CONFIGS[config]())
    x = rng.normal(size=(2, 3, HEADS, KEY_DIM)).astype("float32")
    y = feature_maps.apply(fm, x, "key")
    clone = feature_maps.get(feature_maps.serialize(fm))
    assert type(clone) is type(fm) and clone.get_config() == fm.get_config()
    if not clone.built:
        clone.build(x.shape)
    clone.set_weights(fm.get_weights())
    np.testing.assert_array_equal(feature_maps.apply(clone, x, "key"), y)
    assert feature_maps.output_dim(fm, KEY_DIM) == y.shape[-1]
    layer = kla.LinearMultiHeadAttention(HEADS, KEY_DIM, feature_map=fm)
    again = kla.LinearMultiHeadAttention.from_config(layer.get_config())
    assert again.feature_map.get_config() == fm.get_config()


@pytest.mark.parametrize("name", ["taylor", "hedgehog"])
def test_mixed_precision_features_stay_float32(rng, name):
    x = rng.normal(size=(2, 9, DIM)) * 3
    reference = kla.LinearMultiHeadAttention(HEADS, KEY_DIM, feature_map=name)
    expected = [reference(x, x, use_causal_mask=c) for c in (False, True)]
    keras.config.set_dtype_policy("mixed_float16")
    layer = kla.LinearMultiHeadAttention(HEADS, KEY_DIM, feature_map=name)
    x16 = tf.constant(x, tf.float16)
    layer(x16, x16)
    layer.set_weights(reference.get_weights())
    q = tf.constant(rng.normal(size=(2, 9, HEADS, KEY_DIM)), tf.float16)
    assert feature_maps.apply(layer.feature_map, q, "query").dtype == "float32"
    for causal, exp in zip((False, True), expected, strict=True):
        out = layer(x16, x16, use_causal_mask=causal)
        assert out.dtype == "float16"
        scale = np.max(np.abs(exp))
        assert np.max(np.abs(np.asarray(out, np.float32) - exp)) < 1e-2 * scale


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"expected one of \[.*'hedgehog'.*'taylor'\]"):
        feature_maps.get("softmax")
    with pytest.raises(ValueError, match="not a serialized Keras object"):
        feature_maps.get({"class_name": "TaylorFeatureMap", "compact": True})
    with pytest.raises(TypeError, match="`compact`"):
        kla.TaylorFeatureMap(compact="yes")
    with pytest.raises(ValueError, match="`num_features`"):
        kla.HedgehogFeatureMap(num_features=0)
    with pytest.raises(ValueError, match=r"heads on axis -2; received input_shape \(4,\)"):
        kla.HedgehogFeatureMap().build((4,))
    fm = kla.HedgehogFeatureMap()
    fm(np.zeros((1, 3, 4, 8), "float32"))  # built for 4 heads of 8
    with pytest.raises(ValueError, match=r"`inputs` have heads=2 on axis -2.*heads=4"):
        fm(np.zeros((1, 3, 2, 8), "float32"))
    with pytest.raises(ValueError, match=r"`inputs` have key_dim=6 on axis -1.*key_dim=8"):
        fm(np.zeros((1, 3, 4, 6), "float32"))
    layer = kla.LinearMultiHeadAttention(num_heads=2, key_dim=8, feature_map=fm)
    x = np.zeros((1, 3, 16), "float32")
    with pytest.raises(ValueError, match=r"`inputs` have heads=2 on axis -2"):
        layer(x, x)
    separate = kla.HedgehogFeatureMap(separate_query_key=True)
    with pytest.raises(ValueError, match="separate_query_key=True: pass `role="):
        separate(np.zeros((1, 3, 2, 8), "float32"))


# ---- language model: generation and export -----------------------------------


@pytest.fixture(scope="module", params=["taylor", "hedgehog"])
def lm(request):
    keras.utils.set_random_seed(5)
    model = build_causal_lm(
        13, sequence_length=16, hidden_dim=8, num_heads=2, num_layers=1, feature_map=request.param
    )
    if request.param == "hedgehog":  # away from the identity
        fm = model.get_layer("decoder_0").self_attention.feature_map
        _randomize(fm, np.random.default_rng(1))
    return request.param, model


def test_greedy_generation_equals_parallel_recomputation(lm):
    _, model = lm
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    seq = prompts
    for _ in range(4):
        logits = np.asarray(model(seq))[:, -1]
        seq = np.concatenate([seq, np.argmax(logits, -1)[:, None]], axis=1)
    np.testing.assert_array_equal(kla.generate(model, prompts, 4), seq)


def test_exports_to_saved_model_and_builtin_tflite(lm, tmp_path):
    """SavedModel serve/prefill/step match Keras; one TFLite signature per
    map, builtin operators only, matches Keras too: Taylor's `serve` (both
    branches of the short/chunked switch, φ on heads-first tensors and on
    chunks), Hedgehog's `step` (its weights, one token at a time). One
    conversion each, for the CI budget: `test_export` converts both
    signatures of the default map."""
    name, model = lm
    x = parity.sample_inputs(model, length=9)
    path = str(tmp_path / "sm")
    assert export_saved_model(model, path) == ["serve", "prefill", "step"]
    errors = parity.saved_model_errors(model, path, x)
    assert set(errors) == {"serve", "prefill+step"} and max(errors.values()) < 1e-5, errors
    signature = {"taylor": "serve", "hedgehog": "step"}[name]
    check = {"serve": parity.tflite_serve_error, "step": parity.tflite_step_error}[signature]
    flatbuffer = convert_to_tflite(path, signature)
    ops = builtin_ops(flatbuffer)
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    assert check(model, flatbuffer, x) < 1e-4
