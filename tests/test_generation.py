"""Generation: greedy decoding equals full parallel recomputation, token for token."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close

from keras_linear_attention import RecurrentLM, build_causal_lm, generate


@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(1)
    return build_causal_lm(23, max_length=64, hidden_dim=16, num_heads=2, num_layers=2)


def _greedy_by_recomputation(model, prompts, steps):
    seq = np.asarray(prompts)
    for _ in range(steps):
        logits = np.asarray(model(seq))[:, -1]
        seq = np.concatenate([seq, np.argmax(logits, -1)[:, None]], axis=1)
    return seq


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_greedy_generation_equals_parallel_recomputation(position):
    keras.utils.set_random_seed(2)
    model = build_causal_lm(23, max_length=64, hidden_dim=16, num_heads=2, position=position)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    expected = _greedy_by_recomputation(model, prompts, 20)
    np.testing.assert_array_equal(generate(model, prompts, 20), expected)


def test_prefill_state_equals_token_by_token_state(lm):
    runner = RecurrentLM(lm)
    tokens = tf.constant([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits, prefilled = runner.prefill(tokens)
    states = runner.initial_state(1)
    for i in range(tokens.shape[1]):
        step_logits, states = runner.step(tokens[:, i], states, i)
    for a, b in zip(prefilled, states, strict=True):
        assert_close("prefill state vs steps", a, b, 1e-5, 1e-5)
    assert_close("prefill logits vs steps", step_logits, logits, 1e-5, 1e-5)
    assert_close("prefill logits vs parallel", logits, lm(tokens)[:, -1], 1e-5, 1e-5)


def test_state_size_does_not_grow_with_context(lm):
    runner = RecurrentLM(lm)
    _, short = runner.prefill(tf.constant([[1] * 4]))
    _, long = runner.prefill(tf.constant([[1] * 60]))
    assert [s.shape for s in short] == [s.shape for s in long]


def test_sampling_is_seeded_and_top_k_one_is_greedy(lm):
    prompts = [[1, 2, 3]]
    a = generate(lm, prompts, 15, temperature=1.0, seed=7)
    np.testing.assert_array_equal(a, generate(lm, prompts, 15, temperature=1.0, seed=7))
    others = [generate(lm, prompts, 15, temperature=1.0, seed=s) for s in range(3)]
    assert any(not np.array_equal(a, o) for o in others)
    np.testing.assert_array_equal(
        generate(lm, prompts, 15, temperature=1.0, top_k=1), generate(lm, prompts, 15)
    )


def test_stop_token_pads_finished_sequences(lm):
    greedy = generate(lm, [[1, 2, 3]], 10)
    stop = int(greedy[0, 5])
    out = generate(lm, [[1, 2, 3]], 10, stop_token_id=stop)
    first = 3 + int(np.argmax(greedy[0, 3:] == stop))
    np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
    assert np.all(out[0, first:] == stop)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[1.5, 2.0]], {}, "integer token ids"),
        ([[]], {}, "prompt_length>0"),
        ([[1, 2]], {"max_new_tokens": 63}, "max_length=64"),
        ([[1, 2]], {"temperature": -1.0}, "temperature"),
    ],
)
def test_generate_checks_its_arguments(lm, prompts, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(lm, prompts, **kwargs)


def test_softmax_lm_cannot_run_as_rnn():
    model = build_causal_lm(9, max_length=8, hidden_dim=8, num_heads=2, attention="softmax")
    with pytest.raises(ValueError, match="cannot run as an RNN"):
        RecurrentLM(model)
