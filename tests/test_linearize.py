"""`linearize` and `attention_transfer`: a softmax model made linear, same weights.

The float64 references are those of `reference.py` (the explicit T×S
kernel matrix over the original softmax layer's projections).
"""

import shutil
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, assert_transfer_left_alone, frozen_weights, weight_values
from reference import EPS, elu_plus_one, hedgehog, layer_reference

import keras_linear_attention as kla
from keras_linear_attention.linearize._common import attention_layers

TOL = dict(rtol=2e-4, atol=2e-5)
DIM, HEADS, KEY_DIM, T = 6, 2, 4, 9


def _mha(name="att", **kwargs):
    """A softmax MHA with seeded weights of scale 0.5 (errors show)."""
    return keras.layers.MultiHeadAttention(
        HEADS,
        KEY_DIM,
        name=name,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=1),
        bias_initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=2),
        **kwargs,
    )


def _attention_model(causal=True, name="att", **call_kwargs):
    x = keras.Input((T, DIM), name="x")
    y = _mha(name)(x, x, use_causal_mask=causal, **call_kwargs)
    return keras.Model(x, keras.layers.Dense(3, name="head")(y), name="attention_model")


def _x(rng, *shape):
    return rng.normal(size=shape).astype("float32")


def _projections(layer):
    """`{"query/kernel": ...}` of an attention layer, float64."""
    return {
        "/".join(w.path.split("/")[-2:]): tf.constant(w.numpy(), tf.float64) for w in layer.weights
    }


def _identity_hedgehog(x):
    eye = np.broadcast_to(np.eye(KEY_DIM), (HEADS, KEY_DIM, KEY_DIM))
    return hedgehog(x, tf.constant(eye, tf.float64))


def _names(model):
    """Names of the model's layers (nested models' too) and attention layers' paths."""
    names = []
    for layer in model.layers:
        names.append(layer.name)
        if isinstance(layer, keras.Model):
            names += [f"{layer.name}/{name}" for name in _names(layer)]
    return names + [path for path, _ in attention_layers(model)]


def _lm(attention="softmax", **kwargs):
    keras.utils.set_random_seed(0)
    return kla.build_causal_lm(
        40, sequence_length=16, hidden_dim=8, num_heads=2, attention=attention, **kwargs
    )


# ---- weights and structure --------------------------------------------------


def test_elu_keeps_every_weight_and_name_in_order():
    softmax = _lm()
    before = weight_values(softmax)
    linear = kla.linearize(softmax, feature_map="elu")
    assert [w.name for w in linear.weights] == [w.name for w in softmax.weights]
    for a, b in zip(weight_values(linear), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _names(linear) == _names(softmax)
    for i in range(2):
        attention = linear.get_layer(f"decoder_{i}").self_attention
        assert isinstance(attention, kla.CausalLinearAttention)
    # The original is untouched: same layers, same values, independent variables.
    assert isinstance(
        softmax.get_layer("decoder_0").self_attention, keras.layers.MultiHeadAttention
    )
    assert not {id(w) for w in softmax.weights} & {id(w) for w in linear.weights}
    linear.weights[0].assign(linear.weights[0] + 1.0)
    np.testing.assert_array_equal(softmax.weights[0].numpy(), before[0])


def test_hedgehog_adds_only_the_feature_maps_weights():
    softmax = _lm()
    linear = kla.linearize(softmax)  # hedgehog by default
    new = [w for w in linear.weights if "hedgehog" in w.path]
    per_layer = [("query_kernel", (2, 4, 4)), ("query_bias", (2, 4))]
    per_layer += [("key_kernel", (2, 4, 4)), ("key_bias", (2, 4))]
    assert [(w.name, tuple(w.shape)) for w in new] == 2 * per_layer
    kept = [w for w in linear.weights if "hedgehog" not in w.path]
    for a, b in zip(kept, softmax.weights, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("attention", ["lm", "classifier"])
def test_equals_the_same_model_built_linear_with_the_softmax_weights(rng, attention):
    """Same semantics as the package's own linear model: masks and causality kept."""
    if attention == "lm":
        build = lambda kind: _lm(kind, feature_map="elu")
        x = rng.integers(0, 40, size=(2, 11))
    else:
        build = lambda kind: kla.build_sequence_classifier(
            3, vocabulary_size=20, sequence_length=12, hidden_dim=8, num_heads=2, attention=kind
        )
        x = np.concatenate([rng.integers(1, 20, (2, 8)), np.zeros((2, 4), int)], axis=1)
    softmax, native = build("softmax"), build("linear")
    native.set_weights(softmax.get_weights())
    linear = kla.linearize(softmax, feature_map="elu")
    assert_close(f"linearized {attention}", linear(x), native(x), 1e-5, 1e-5)


# ---- exact reference before any transfer ------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", ["elu", "hedgehog"])
def test_functional_layer_computes_the_float64_reference(rng, causal, feature_map):
    softmax = _attention_model(causal)
    linear = kla.linearize(softmax, feature_map=feature_map)
    x = _x(rng, 2, T, DIM)
    attention = keras.Model(linear.input, linear.get_layer("att").output)
    phi = elu_plus_one if feature_map == "elu" else _identity_hedgehog
    w = _projections(softmax.get_layer("att"))
    expected = layer_reference(w, x, x, phi=phi, causal=causal)
    assert_close(f"linearized {feature_map} causal={causal}", attention(x), expected, **TOL)


def test_decoder_self_attention_computes_the_causal_reference(rng):
    softmax = _lm()
    linear = kla.linearize(softmax)
    x = _x(rng, 2, 7, 8)
    w = _projections(softmax.get_layer("decoder_1").self_attention)
    expected = layer_reference(w, x, x, phi=_identity_hedgehog, causal=True)
    out = linear.get_layer("decoder_1").self_attention(x)
    assert_close("linearized decoder self-attention", out, expected, **TOL)


def test_padding_masks_are_kept(rng):
    x = keras.Input((T, DIM), name="x")
    keep = keras.Input((T,), dtype="bool", name="keep")
    y = _mha()(x, x, value_mask=keep)
    linear = kla.linearize(keras.Model([x, keep], y), feature_map="elu")
    xs, mask = _x(rng, 2, T, DIM), np.arange(T)[None, :] < np.array([[5], [9]])
    expected = layer_reference(_projections(linear.get_layer("att")), xs, xs, key_mask=mask)
    assert_close("linearized value_mask", linear([xs, mask]), expected, **TOL)


def test_predict_under_xla_matches_eager(rng):
    linear = kla.linearize(_lm())
    x = rng.integers(0, 40, size=(3, 16))
    linear.compile(jit_compile=True)
    assert_close("linearized xla predict", linear.predict(x, verbose=0), linear(x), 1e-5, 1e-5)


def test_saves_loads_and_generates_recurrently(tmp_path, rng):
    linear = kla.linearize(_lm())
    path = str(tmp_path / "linearized.keras")
    linear.save(path)
    x = rng.integers(0, 40, size=(1, 6))
    assert_close("linearized reload", keras.models.load_model(path)(x), linear(x), 1e-6, 1e-6)
    out = kla.generate(linear, x, 4, temperature=0.0)
    assert out.shape == (1, 10)


# ---- where attention layers live --------------------------------------------


def test_sequential_and_nested_models(rng):
    inner = _attention_model(causal=True)
    x = keras.Input((T, DIM), name="outer_x")
    outer = keras.Model(x, keras.layers.Dense(2, name="out")(inner(x)), name="outer")
    block = kla.LinearTransformerEncoder(8, 2, attention="softmax", name="encoder")
    sequential = keras.Sequential([keras.Input((T, DIM)), block, inner], name="seq")
    xs = _x(rng, 2, T, DIM)
    for model in (outer, sequential):
        before = weight_values(model)
        linear = kla.linearize(model, feature_map="elu")
        assert _names(linear) == _names(model)
        for a, b in zip(weight_values(linear), before, strict=True):
            np.testing.assert_array_equal(a, b)
        converted = attention_layers(linear)
        assert converted and all(isinstance(a, kla.LinearMultiHeadAttention) for _, a in converted)
        assert linear(xs).shape == model(xs).shape
    # The nested functional model computes the reference of its own MHA.
    linear_inner = kla.linearize(outer, feature_map="elu").get_layer("attention_model")
    w = _projections(inner.get_layer("att"))
    head = linear_inner.get_layer("head")
    expected = layer_reference(w, xs, xs, causal=True) @ head.kernel.numpy() + head.bias.numpy()
    assert_close("nested model", linear_inner(xs), expected, **TOL)


@keras.saving.register_keras_serializable(package="test_linearize")
class _Block(keras.layers.Layer):
    """A user's block: attention held as an attribute and in a list."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.attention = _mha("first")
        self.more = [keras.layers.Dense(DIM, name="mix"), _mha("second")]

    def call(self, x):
        y = self.attention(self.norm(x), x, use_causal_mask=True)
        return self.more[1](self.more[0](y), y)


def test_attention_held_by_a_custom_layer(rng):
    x = keras.Input((T, DIM), name="x")
    model = keras.Model(x, _Block(name="block")(x))
    xs = _x(rng, 2, T, DIM)
    before = weight_values(model)
    linear = kla.linearize(model, feature_map="elu")
    block = linear.get_layer("block")
    assert isinstance(block.attention, kla.LinearMultiHeadAttention)
    assert isinstance(block.more[1], kla.LinearMultiHeadAttention)
    assert block._layers.index(block.attention) == 1  # the slot the softmax layer had
    for a, b in zip(weight_values(linear), before, strict=True):
        np.testing.assert_array_equal(a, b)
    norm, mix = block.norm(xs), block.more[0]
    first = layer_reference(_projections(block.attention), norm, xs, causal=True)
    mixed = mix(tf.cast(first, tf.float32))
    expected = layer_reference(_projections(block.more[1]), mixed, first)
    assert_close("custom block", linear(xs), expected, 1e-4, 1e-4)


# ---- what cannot be converted, and bad arguments ----------------------------


def _subset_axes_model():
    x = keras.Input((3, 4, DIM), name="grid")
    return keras.Model(x, _mha(attention_axes=(2,))(x, x))


class _CustomMHA(keras.layers.MultiHeadAttention):
    pass


def _subclass_model():
    x = keras.Input((T, DIM), name="x")
    return keras.Model(x, _CustomMHA(2, 4, name="att")(x, x))


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: _attention_model(False, attention_mask=np.tril(np.ones((T, T), bool))),
            "attention_mask",
        ),
        (_subset_axes_model, "attention_axes"),
        (_subclass_model, "_CustomMHA, a subclass"),
    ],
)
def test_unconvertible_layers_are_named(build, match):
    model = build()
    with pytest.raises(ValueError, match=f"layer 'att' .*{match}"):
        kla.linearize(model)
    with pytest.warns(UserWarning, match=f"kept these layers softmax: att: .*{match}"):
        kept = kla.linearize(model, skip_unconvertible=True)
    layer = kept.get_layer("att")
    assert type(layer) is type(model.get_layer("att"))
    for a, b in zip(kept.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_skipping_converts_the_rest():
    x = keras.Input((T, DIM), name="x")
    y = _mha("masked")(x, x, attention_mask=np.ones((T, T), bool))
    y = _mha("plain")(y, y)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        linear = kla.linearize(keras.Model(x, y), skip_unconvertible=True)
    assert type(linear.get_layer("masked")) is keras.layers.MultiHeadAttention
    assert isinstance(linear.get_layer("plain"), kla.LinearMultiHeadAttention)


def test_recurrences():
    linear = kla.linearize(_lm(), recurrence="gated")
    attention = linear.get_layer("decoder_0").self_attention
    assert attention.recurrence == "gated"
    assert linear(np.zeros((1, 5), "int32")).shape == (1, 5, 40)
    with pytest.raises(ValueError, match="layer 'att'.*recurrence='retention'"):
        kla.linearize(_attention_model(causal=True), recurrence="retention")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: kla.linearize(m.layers[1]), TypeError, "functional or Sequential"),
        (lambda m: kla.linearize(m, recurrence="lstm"), ValueError, "`recurrence` must be one of"),
        (lambda m: kla.linearize(m, feature_map="nope"), ValueError, "Unknown `feature_map`"),
        (lambda m: kla.linearize(m, "hedgehog", "gated"), ValueError, "recurrence='linear' only"),
        (lambda m: kla.linearize(m, skip_unconvertible=1), TypeError, "skip_unconvertible"),
        (lambda m: kla.linearize(kla.linearize(m)), ValueError, "no softmax attention layer"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(_attention_model())


# ---- attention transfer -------------------------------------------------------


def _kjv_batches(n, length=32, batch=8):
    """`n` batches of real text: bytes of the King James Bible."""
    from keras_linear_attention.datasets import kjv_bible

    text = "\n".join(kjv_bible.read_verses()[: 40 * n]).encode()
    ids = np.frombuffer(text, np.uint8).astype("int32")[: n * batch * length]
    return list(ids.reshape(n, batch, length))


needs_kjv = pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv missing")


@needs_kjv
def test_transfer_reduces_every_layers_loss_on_real_text():
    softmax = _trained_softmax_lm()
    batches = _kjv_batches(3)
    before = weight_values(softmax)
    linear = kla.linearize(softmax)
    frozen = frozen_weights(linear)
    history = kla.attention_transfer(
        softmax, linear, batches[:2], steps=24, learning_rate=0.03, verbose=0
    )
    assert set(history) == {"loss", "decoder_0/self_attention", "decoder_1/self_attention"}
    for name, losses in history.items():
        assert len(losses) == 24
        first, last = np.mean(losses[:2]), np.mean(losses[-2:])
        assert last < 0.8 * first, (name, first, last)
    # Only the feature maps trained; the softmax model is untouched.
    assert_transfer_left_alone(softmax, before, linear, frozen)


def test_attention_weights_objective_is_hedgehogs_cross_entropy(rng):
    """The first step's loss is −Σ_s a log â averaged over (batch, head,
    query), `a` the softmax weights and `â` the float64 reference of the
    linearized layer's normalised kernel weights; training lowers it."""
    softmax = _attention_model(causal=True)
    linear = kla.linearize(softmax)
    x = _x(rng, 2, T, DIM)
    _, target = softmax.get_layer("att")(x, x, use_causal_mask=True, return_attention_scores=True)
    w = _projections(softmax.get_layer("att"))
    q, k = (
        _identity_hedgehog(tf.einsum("btc,chd->bthd", x, w[f"{n}/kernel"]) + w[f"{n}/bias"])
        for n in ("query", "key")
    )
    kernel = tf.einsum("bthd,bshd->bhts", q, k) * np.tril(np.ones((T, T)))
    weights = kernel / (tf.reduce_sum(kernel, -1, keepdims=True) + EPS)
    cross = tf.math.xlogy(tf.cast(target, tf.float64), weights)  # 0 where a = 0
    expected = -tf.reduce_mean(tf.reduce_sum(cross, -1))
    history = kla.attention_transfer(
        softmax, linear, [x], steps=30, objective="attention_weights", verbose=0
    )
    assert_close("attention-weights loss", history["loss"][0], expected, 1e-4, 1e-5)
    assert history["loss"][-1] < 0.9 * history["loss"][0]


def test_attention_weights_objective_needs_linear_recurrences():
    softmax = _lm()
    with pytest.raises(ValueError, match="objective='attention_weights'.*recurrence='linear'"):
        kla.attention_transfer(
            softmax, kla.linearize(softmax, recurrence="gated"), [np.zeros((2, 8), "int32")],
            objective="attention_weights", verbose=0,
        )  # fmt: skip


def _trained_softmax_lm():
    """A small softmax char LM trained briefly on KJV text, so attention is peaked."""
    keras.utils.set_random_seed(0)
    model = kla.build_causal_lm(
        256, hidden_dim=16, num_heads=2, num_layers=2, position="sinusoidal", attention="softmax"
    )
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(True))
    data = np.concatenate(_kjv_batches(12, length=33))
    model.fit(data[:, :-1], data[:, 1:], batch_size=16, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize("jit_compile", [False, True])
def test_transfer_on_a_padded_classifier(rng, jit_compile):
    """Non-causal encoder blocks, padding from the embedding's mask, XLA or not."""
    keras.utils.set_random_seed(0)
    softmax = kla.build_sequence_classifier(
        3, vocabulary_size=20, sequence_length=12, hidden_dim=8, num_heads=2, attention="softmax"
    )
    linear = kla.linearize(softmax)
    tokens = np.concatenate([rng.integers(1, 20, (4, 8)), np.zeros((4, 4), int)], axis=1)
    labels = np.zeros(4, int)
    history = kla.attention_transfer(
        softmax, linear, [(tokens, labels)], steps=5, jit_compile=jit_compile, verbose=0
    )
    assert list(history) == ["loss", "encoder_0/self_attention", "encoder_1/self_attention"]
    assert history["loss"][-1] < history["loss"][0]


def _models():
    softmax = _attention_model()
    return softmax, kla.linearize(softmax)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=0), ValueError, "`steps` must be a positive int"),
        (dict(learning_rate=0.0), ValueError, "`learning_rate` must be a positive"),
        (dict(optimizer="adam"), TypeError, "`optimizer` must be a keras Optimizer"),
        (dict(verbose=3), ValueError, "`verbose` must be 0, 1 or 2"),
        (dict(jit_compile=None), TypeError, "`jit_compile`"),
        (dict(objective="kl"), ValueError, "`objective` must be one of"),
        (dict(dataset=np.zeros((2, T, DIM), "float32")), TypeError, "must yield batches"),
        (dict(dataset=[]), ValueError, "yielded no batch"),
    ],
)
def test_transfer_bad_arguments(kwargs, error, match):
    softmax, linear = _models()
    kwargs = {"dataset": [np.zeros((2, T, DIM), "float32")], "steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        kla.attention_transfer(softmax, linear, verbose=kwargs.pop("verbose", 0), **kwargs)


def test_transfer_needs_matching_models_with_new_weights():
    softmax, _ = _models()
    batch = [np.zeros((2, T, DIM), "float32")]
    with pytest.raises(ValueError, match="no new trainable weights"):
        kla.attention_transfer(softmax, kla.linearize(softmax, "elu"), batch, verbose=0)
    with pytest.raises(ValueError, match="must have the attention layers of `softmax_model`"):
        kla.attention_transfer(softmax, kla.linearize(_lm()), batch, verbose=0)
    with pytest.raises(ValueError, match="nothing to transfer"):
        kla.attention_transfer(softmax, softmax, batch, verbose=0)


def test_transfer_stops_with_a_one_shot_iterator():
    softmax, linear = _models()
    batches = iter([np.zeros((2, T, DIM), "float32")] * 2)
    with pytest.warns(UserWarning, match="ran out after 2 of 5 steps"):
        history = kla.attention_transfer(softmax, linear, batches, steps=5, verbose=0)
    assert len(history["loss"]) == 2
