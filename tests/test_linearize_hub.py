"""`linearize` and `attention_transfer` on keras-hub models: Transformer
blocks in functional models, GPT-2's backbone and CausalLM (recurrent
`generate`), and the keras-hub layers it refuses."""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from conftest import TINY_GPT2, assert_transfer_left_alone, frozen_weights, weight_values

keras_hub = pytest.importorskip("keras_hub")
import keras_linear_attention as kla  # noqa: E402
from keras_linear_attention import hub  # noqa: E402

T, DIM, HEADS, FF = 7, 8, 2, 16
GPT2 = TINY_GPT2
LENGTH = 10
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]


def _randomize(model, seed=0, scale=0.5):
    """Weights away from keras-hub's init (zero biases, unit norms, tiny values)."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, scale, w.shape).astype("float32") for w in model.weights])


def _assert_same_weights(a, b):
    assert [w.path for w in a.weights] == [w.path for w in b.weights]
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def _blocks_model(encoder_cls, decoder_cls, **kwargs):
    """An encoder block, then a decoder block with cross-attention to it, both
    masking right padding; `kwargs` go to both blocks (e.g. `feature_map`)."""
    x = keras.Input((T, DIM), name="x")
    mask = keras.Input((T,), dtype="int32", name="mask")
    encoded = encoder_cls(FF, HEADS, name="encoder", **kwargs)(x, padding_mask=mask)
    y = decoder_cls(FF, HEADS, name="decoder", **kwargs)(
        x, encoded, decoder_padding_mask=mask, encoder_padding_mask=mask
    )
    return keras.Model([x, mask], keras.layers.Dense(3, name="head")(y))


def _blocks_inputs(seed=1):
    x = np.random.default_rng(seed).normal(size=(2, T, DIM)).astype("float32")
    mask = np.ones((2, T), "int32")
    mask[1, -2:] = 0
    return [x, mask]


def _gpt2_inputs(prompts=PROMPTS, length=LENGTH):
    ids = np.zeros((len(prompts), length), "int32")
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = prompt, True
    return {"token_ids": ids, "padding_mask": mask}


@pytest.fixture(scope="module")
def gpt2_lm():
    keras.utils.set_random_seed(3)
    lm = keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(**GPT2))
    _randomize(lm)
    lm.compile(sampler="greedy")
    return lm


# ---- Transformer blocks in a functional model --------------------------------


def test_hub_blocks_become_kla_hub_blocks_with_the_same_weights():
    keras.utils.set_random_seed(0)
    softmax = _blocks_model(
        keras_hub.layers.TransformerEncoder, keras_hub.layers.TransformerDecoder
    )
    _randomize(softmax)
    before = weight_values(softmax)
    linear = kla.linearize(softmax, feature_map="elu")
    assert type(linear.get_layer("encoder")) is hub.TransformerEncoder
    assert type(linear.get_layer("decoder")) is hub.TransformerDecoder
    _assert_same_weights(linear, softmax)
    # The same as the model built with kla.hub blocks and given the softmax weights.
    direct = _blocks_model(hub.TransformerEncoder, hub.TransformerDecoder, feature_map="elu")
    direct.set_weights(softmax.get_weights())
    inputs = _blocks_inputs()
    np.testing.assert_array_equal(linear(inputs).numpy(), direct(inputs).numpy())
    # The original is untouched.
    assert type(softmax.get_layer("decoder")) is keras_hub.layers.TransformerDecoder
    for a, b in zip(weight_values(softmax), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_hub_blocks_with_hedgehog_add_only_the_feature_maps():
    softmax = _blocks_model(
        keras_hub.layers.TransformerEncoder, keras_hub.layers.TransformerDecoder
    )
    linear = kla.linearize(softmax)
    kept = [w for w in linear.weights if "hedgehog" not in w.path]
    assert [w.path for w in kept] == [w.path for w in softmax.weights]
    assert len(linear.weights) > len(kept)
    assert np.isfinite(linear(_blocks_inputs())).all()


# ---- GPT-2 -------------------------------------------------------------------


def test_gpt2_backbone_becomes_linear_gpt2_backbone():
    keras.utils.set_random_seed(0)
    softmax = keras_hub.models.GPT2Backbone(**GPT2)
    _randomize(softmax)
    linear = kla.linearize(softmax, feature_map="elu")
    assert type(linear) is hub.LinearGPT2Backbone
    assert linear.get_config() == {**softmax.get_config(), "feature_map": linear.feature_map}
    _assert_same_weights(linear, softmax)
    direct = hub.LinearGPT2Backbone(**GPT2)
    direct.set_weights(softmax.get_weights())
    inputs = _gpt2_inputs()
    np.testing.assert_array_equal(linear(inputs).numpy(), direct(inputs).numpy())


def test_gpt2_causal_lm_generates_recurrently(gpt2_lm):
    before = weight_values(gpt2_lm)
    linear = kla.linearize(gpt2_lm, feature_map="elu")
    assert type(linear) is hub.LinearGPT2CausalLM
    assert type(linear.backbone) is hub.LinearGPT2Backbone
    assert linear.name == gpt2_lm.name and linear.preprocessor is gpt2_lm.preprocessor
    assert type(linear.sampler) is type(gpt2_lm.sampler) and linear.sampler is not gpt2_lm.sampler
    _assert_same_weights(linear, gpt2_lm)
    out = np.asarray(linear.generate(_gpt2_inputs(), stop_token_ids=None)["token_ids"])
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(out[row, : len(prompt)], prompt)
        for t in range(len(prompt), LENGTH):  # greedy = argmax of the parallel logits
            ids = out[row : row + 1, :t]
            logits = linear({"token_ids": ids, "padding_mask": np.ones_like(ids)})
            assert out[row, t] == int(np.argmax(logits[0, -1])), (row, t)
    # The original is untouched and still generates with softmax attention.
    assert type(gpt2_lm.backbone.transformer_layers[0]) is keras_hub.layers.TransformerDecoder
    for a, b in zip(weight_values(gpt2_lm), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:`compile\\(\\)` was not called:UserWarning")  # keras-hub's
def test_gpt2_causal_lm_keeps_its_preprocessor_and_reloads(tmp_path):
    keras.utils.set_random_seed(1)
    preprocessor = hub.LinearGPT2CausalLMPreprocessor(hub.ByteLevelTokenizer(), sequence_length=8)
    backbone = keras_hub.models.GPT2Backbone(**{**GPT2, "vocabulary_size": 256})
    softmax = keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)
    _randomize(softmax)
    linear = kla.linearize(softmax, feature_map="elu")
    assert linear.preprocessor is preprocessor
    linear.compile(sampler="greedy")
    text = linear.generate("In", max_length=8)
    assert text.startswith("In")
    path = str(tmp_path / "linearized.keras")
    linear.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is hub.LinearGPT2CausalLM
    loaded.compile(sampler="greedy")
    assert loaded.generate("In", max_length=8) == text


def test_attention_transfer_on_gpt2(gpt2_lm):
    softmax_before = weight_values(gpt2_lm)
    linear = kla.linearize(gpt2_lm)  # Hedgehog, trainable
    frozen = frozen_weights(linear)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, GPT2["vocabulary_size"], (4, 12)).astype("int32")
    batch = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    history = kla.attention_transfer(gpt2_lm, linear, [batch], steps=15, verbose=0)
    name = gpt2_lm.backbone.name
    layers = [f"{name}/transformer_layer_{i}/self_attention" for i in range(2)]
    assert list(history) == ["loss", *layers]
    for name in layers:
        assert history[name][-1] < 0.7 * history[name][0], (name, history[name])
    assert_transfer_left_alone(gpt2_lm, softmax_before, linear, frozen)


# ---- what is refused ---------------------------------------------------------


class _Decoder(keras_hub.layers.TransformerDecoder):
    pass


def _opt_backbone():
    return keras_hub.models.OPTBackbone(**{k: v for k, v in GPT2.items() if k != "dropout"})


def _decoder_subclass_model():
    x = keras.Input((T, DIM), name="x")
    return keras.Model(x, _Decoder(FF, HEADS, name="dec")(x))


def _masked_decoder_model():
    x = keras.Input((T, DIM), name="x")
    mask = np.tril(np.ones((1, T, T), bool))
    dec = keras_hub.layers.TransformerDecoder(FF, HEADS, name="dec")
    return keras.Model(x, dec(x, decoder_attention_mask=mask))


@pytest.mark.parametrize(
    "build, path, match",
    [
        (_opt_backbone, "opt_backbone", "keras-hub OPTBackbone with softmax attention"),
        (_decoder_subclass_model, "dec/self_attention", "CachedMultiHeadAttention, a subclass"),
        (_masked_decoder_model, "dec", "explicit `decoder_attention_mask`"),
    ],
    ids=["other_backbone", "block_subclass", "attention_mask"],
)
def test_unconvertible_keras_hub_layers_are_named(build, path, match):
    model = build()
    with pytest.raises(ValueError, match=f"layer '{path}' .*{match}"):
        kla.linearize(model)
    with pytest.warns(UserWarning, match=f"kept these layers softmax: {path}: .*{match}"):
        kept = kla.linearize(model, skip_unconvertible=True)
    assert type(kept) is type(model)
    _assert_same_weights(kept, model)


def test_gpt2_needs_the_linear_recurrence(gpt2_lm):
    path = f"{gpt2_lm.name}/{gpt2_lm.backbone.name}"
    with pytest.raises(ValueError, match=f"layer '{path}' .*recurrence='gated'"):
        kla.linearize(gpt2_lm, recurrence="gated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = kla.linearize(gpt2_lm, recurrence="gated", skip_unconvertible=True)
    assert type(kept) is keras_hub.models.GPT2CausalLM
    _assert_same_weights(kept, gpt2_lm)


def test_core_package_linearizes_without_keras_hub():
    code = (
        "import sys; sys.modules['keras_hub'] = None\n"
        "import keras, keras_linear_attention as kla\n"
        "x = keras.Input((4, 8))\n"
        "m = keras.Model(x, keras.layers.MultiHeadAttention(2, 4)(x, x))\n"
        "kla.linearize(m)\n"
        "assert 'keras_linear_attention.hub' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _relu(x):
    return keras.ops.relu(x)


def test_hub_blocks_need_a_feature_map_they_can_rebuild():
    x = keras.Input((T, DIM), name="x")
    model = keras.Model(x, keras_hub.layers.TransformerEncoder(FF, HEADS, name="enc")(x))
    with pytest.raises(ValueError, match="could not build TransformerEncoder for layer 'enc'"):
        kla.linearize(model, feature_map=_relu)
