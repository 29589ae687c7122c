"""GPT-2's architecture with linear attention inside keras-hub's `CausalLM`:
weights from a softmax GPT-2, the recurrent cache against the parallel pass,
keras-hub's samplers, ragged prompts, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_GPT2, assert_close

keras_hub = pytest.importorskip("keras_hub")
from keras_linear_attention.hub import LinearGPT2Backbone, LinearGPT2CausalLM  # noqa: E402

CONFIG = TINY_GPT2
LENGTH = 10
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(3)
    backbone = LinearGPT2Backbone(**CONFIG)
    rng = np.random.default_rng(0)
    backbone.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in backbone.weights])
    model = LinearGPT2CausalLM(backbone)
    model.compile(sampler="greedy")
    return model


def _inputs(prompts, length=LENGTH):
    ids = np.zeros((len(prompts), length), "int32")
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = prompt, True
    return {"token_ids": ids, "padding_mask": mask}


def _generate(lm, prompts, **kwargs):
    return np.asarray(lm.generate(_inputs(prompts), stop_token_ids=None, **kwargs)["token_ids"])


def test_softmax_gpt2_weights_load_in_the_same_order():
    softmax, linear = keras_hub.models.GPT2Backbone(**CONFIG), LinearGPT2Backbone(**CONFIG)
    assert [w.path for w in linear.weights] == [w.path for w in softmax.weights]
    linear.set_weights(softmax.get_weights())
    for a, b in zip(linear.weights, softmax.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("jit", [False, True], ids=["function", "xla"])
def test_cache_steps_equal_the_parallel_pass(lm, jit):
    ids = np.asarray(_inputs([PROMPTS[2] + [1, 2, 3]])["token_ids"])
    parallel = lm({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    step = tf.function(lm.call_with_cache, jit_compile=jit)
    logits, _, cache = step(ids[:, :4], lm.get_initial_state(1), 0)
    outs = [logits]
    for t in range(4, LENGTH):
        logits, _, cache = step(ids[:, t : t + 1], cache, t)
        outs.append(logits)
    assert_close(f"gpt2 cache steps {jit}", tf.concat(outs, 1), parallel, 2e-4, 2e-5)


def test_greedy_generation_equals_parallel_recomputation(lm):
    out = _generate(lm, PROMPTS[:1])[0]
    for t in range(len(PROMPTS[0]), LENGTH):
        ids = out[None, :t]
        logits = lm({"token_ids": ids, "padding_mask": np.ones_like(ids)})
        assert out[t] == int(np.argmax(logits[0, -1])), t


def test_ragged_prompts_equal_each_prompt_alone(lm):
    together = _generate(lm, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(together[row], _generate(lm, [prompt])[0])


@pytest.mark.parametrize(
    "sampler",
    [
        keras_hub.samplers.TopKSampler(k=1),
        keras_hub.samplers.TopPSampler(p=0.9, seed=1),
        keras_hub.samplers.RandomSampler(seed=1),
        keras_hub.samplers.BeamSampler(num_beams=2),
    ],
    ids=["top_k", "top_p", "random", "beam"],
)
def test_keras_hub_samplers(lm, sampler):
    greedy = _generate(lm, PROMPTS)
    lm.compile(sampler=sampler)
    try:
        out = _generate(lm, PROMPTS)
    finally:
        lm.compile(sampler="greedy")
    assert out.shape == greedy.shape
    assert ((out >= 0) & (out < CONFIG["vocabulary_size"])).all()
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(out[row, : len(prompt)], prompt)
    if isinstance(sampler, keras_hub.samplers.TopKSampler):  # k = 1 is greedy
        np.testing.assert_array_equal(out, greedy)


def test_stop_token_ends_each_row(lm):
    out = lm.generate(_inputs(PROMPTS), stop_token_ids=(int(_generate(lm, PROMPTS)[0, 5]),))
    mask = np.asarray(out["padding_mask"])
    assert mask[0, :6].all() and not mask[0, 6:].any()


def test_saves_loads_and_trains(lm, tmp_path):
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, LinearGPT2CausalLM)
    assert isinstance(loaded.backbone, LinearGPT2Backbone)
    loaded.compile(sampler="greedy")
    np.testing.assert_array_equal(_generate(loaded, PROMPTS), _generate(lm, PROMPTS))
    data = _inputs(PROMPTS)
    loaded.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    before = loaded.evaluate(data, data["token_ids"], verbose=0)
    loaded.fit(data, data["token_ids"], epochs=3, verbose=0)
    assert loaded.evaluate(data, data["token_ids"], verbose=0) < before


def test_text_in_text_out_with_the_byte_preprocessor(tmp_path):
    """`generate("text")` and `fit(strings)` through keras-hub's preprocessing."""
    from keras_linear_attention.hub import ByteLevelTokenizer, LinearGPT2CausalLMPreprocessor

    keras.utils.set_random_seed(1)
    preprocessor = LinearGPT2CausalLMPreprocessor(ByteLevelTokenizer(), sequence_length=16)
    backbone = LinearGPT2Backbone(**{**CONFIG, "vocabulary_size": 256, "max_sequence_length": 32})
    lm = LinearGPT2CausalLM(backbone, preprocessor=preprocessor)
    lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.9, seed=2))
    one = lm.generate("In the", max_length=12)
    assert isinstance(one, str) and one.startswith("In the")
    two = lm.generate(["In the", "And God said"], max_length=20)
    assert two[0].startswith("In the") and two[1].startswith("And God said")
    lm.compile(optimizer="adam")  # the task's own loss over its preprocessor's labels
    history = lm.fit(["In the beginning God created"] * 8, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    path = str(tmp_path / "text_lm.keras")
    lm.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.preprocessor.tokenizer, ByteLevelTokenizer)
    loaded.compile(sampler="greedy")
    lm.compile(sampler="greedy")
    expected = lm.generate("In the", max_length=12)
    assert loaded.generate("In the", max_length=12) == expected
    # keras-hub's own format: a local preset directory, reloaded by the base class.
    lm.save_to_preset(str(tmp_path / "preset"))
    preset = keras_hub.models.CausalLM.from_preset(str(tmp_path / "preset"))
    assert isinstance(preset, LinearGPT2CausalLM)
    preset.compile(sampler="greedy")
    assert preset.generate("In the", max_length=12) == expected
    # Keras's export: the parallel forward pass as a SavedModel.
    lm.export(str(tmp_path / "saved_model"), format="tf_saved_model", verbose=False)
    ids = np.array([[73, 110, 32, 116, 104, 101]], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    saved_model = tf.saved_model.load(str(tmp_path / "saved_model"))  # keep: owns variables
    assert_close("gpt2 saved model", saved_model.serve(inputs), lm(inputs), 1e-5, 1e-6)


def test_export_serve_prefill_step_and_tflite_step(lm, tmp_path):
    """`hub.export_causal_lm`: every signature against Keras, and `step`
    converted to TFLite (builtins only) against Keras."""
    from keras_linear_attention.export import convert_to_tflite, parity
    from keras_linear_attention.hub import export_causal_lm

    path = str(tmp_path / "sm")
    assert export_causal_lm(lm, path) == ["serve", "prefill", "step"]
    ids = np.asarray([PROMPTS[0], PROMPTS[2][:5]], "int32")
    mask = np.ones_like(ids, bool)
    expected = np.asarray(lm({"token_ids": ids, "padding_mask": mask}))
    sigs = tf.saved_model.load(path).signatures
    assert_close("hub serve", sigs["serve"](token_ids=ids, padding_mask=mask)["logits"],
                 expected, 1e-5, 1e-5)  # fmt: skip
    states = sigs["prefill"](token_ids=ids[:, :-1])
    assert_close("hub prefill", states.pop("logits"), expected[:, -2], 1e-5, 1e-5)
    assert sorted(states) == ["k_sum_0", "k_sum_1", "kv_0", "kv_1"]
    states = {k: v.numpy() for k, v in states.items()}
    index = np.asarray(ids.shape[1] - 1, np.int32)
    step = sigs["step"](token=ids[:, -1], index=index, **states)["logits"]
    assert_close("hub prefill+step", step, expected[:, -1], 1e-5, 1e-5)
    runner = parity.tflite_runner(convert_to_tflite(path, "step")).get_signature_runner("step")
    lite = runner(token=ids[:, -1], index=index, **states)["logits"]
    assert_close("hub tflite step", lite, expected[:, -1], 1e-4, 1e-4)
