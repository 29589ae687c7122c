"""Model builders: plain functional models that fit, save and load."""

import keras
import numpy as np
import pytest
from conftest import assert_close

from keras_linear_attention import build_causal_lm, build_sequence_classifier
from keras_linear_attention.models.causal_lm import CausalLMParts


def test_classifier_ignores_padding_tokens(rng):
    model = build_sequence_classifier(3, vocabulary_size=20, sequence_length=16, dropout=0.0)
    tokens = rng.integers(1, 20, size=(2, 9))
    padded = np.concatenate([tokens, np.zeros((2, 5), int)], axis=1)
    assert_close("classifier padding", model(padded), model(tokens), 1e-5, 1e-5)


@pytest.mark.parametrize(
    ("position", "attention"),
    [(p, a) for p in ("learned", "sinusoidal", "none") for a in ("linear", "softmax")]
    + [("rotary", "linear")],
)
def test_classifier_fits_saves_and_loads(tmp_path, rng, position, attention):
    model = build_sequence_classifier(
        4, feature_dim=6, sequence_length=12, position=position, attention=attention, hidden_dim=16
    )
    x, y = rng.normal(size=(32, 12, 6)).astype("float32"), rng.integers(0, 4, size=32)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "classifier.keras")
    model.save(path)
    assert_close("classifier save/load", keras.models.load_model(path)(x), model(x), 1e-6, 1e-6)


def test_lm_fits_with_xla_and_mixed_precision(tmp_path, rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = build_causal_lm(11, sequence_length=32, hidden_dim=16, num_heads=2)
    tokens = rng.integers(0, 11, size=(8, 17))
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True
    )
    history = model.fit(tokens[:, :-1], tokens[:, 1:], epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = str(tmp_path / "lm.keras")
    model.save(path)
    x = tokens[:, :-1]
    assert_close("lm save/load", keras.models.load_model(path)(x), model(x), 1e-6, 1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"feature_dim": 4, "vocabulary_size": 9}, "exactly one"),
        ({}, "exactly one"),
        ({"feature_dim": 4}, "sequence_length"),
        ({"feature_dim": 4, "position": "rope"}, "position"),
        ({"feature_dim": 0, "sequence_length": 4}, "feature_dim"),
    ],
)
def test_classifier_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_sequence_classifier(3, **kwargs)


@pytest.mark.parametrize("attention", ["softmax", "delta"])
def test_rotary_positions_need_linear_attention(attention):
    with pytest.raises(ValueError, match="position='rotary'.*attention='linear'"):
        build_causal_lm(11, hidden_dim=8, num_heads=2, position="rotary", attention=attention)


def test_causal_lm_parts_name_what_a_model_lacks():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="lm_head")])
    with pytest.raises(ValueError, match="not a `build_causal_lm` model.*token_embedding"):
        CausalLMParts.of(model)


def test_learned_positions_refuse_longer_inputs():
    model = build_causal_lm(5, sequence_length=8, hidden_dim=8, num_heads=2)
    with pytest.raises(ValueError, match="sequence_length"):
        model(np.zeros((1, 9), "int32"))
