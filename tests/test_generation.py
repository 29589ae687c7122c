"""Generation: greedy decoding equals full parallel recomputation, token for token."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, in_mode

from keras_linear_attention import RecurrentLM, build_causal_lm, generate
from keras_linear_attention.layers import PositionEmbedding, SinusoidalPositionEmbedding


@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(1)
    return build_causal_lm(23, sequence_length=64, hidden_dim=16, num_heads=2, num_layers=2)


def _greedy_by_recomputation(model, prompts, steps):
    seq = np.asarray(prompts)
    for _ in range(steps):
        logits = np.asarray(model(seq))[:, -1]
        seq = np.concatenate([seq, np.argmax(logits, -1)[:, None]], axis=1)
    return seq


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rotary"])
def test_greedy_generation_equals_parallel_recomputation(position):
    keras.utils.set_random_seed(2)
    model = build_causal_lm(23, sequence_length=64, hidden_dim=16, num_heads=2, position=position)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    expected = _greedy_by_recomputation(model, prompts, 20)
    np.testing.assert_array_equal(generate(model, prompts, 20), expected)


def test_prefill_state_equals_token_by_token_state(lm):
    runner = RecurrentLM(lm)
    tokens = tf.constant([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits, prefilled = runner.prefill(tokens)
    states = runner.get_initial_state(1)
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
        ([[1, 2]], {"max_new_tokens": 63}, "sequence_length=64"),
        ([[1, 2]], {"temperature": -1.0}, "temperature"),
        ([[1, 2]], {"temperature": float("nan")}, "`temperature` must be a finite number"),
        ([[1, 2]], {"max_new_tokens": 2.0}, "`max_new_tokens` must be an integer"),
        ([[1, 2]], {"max_new_tokens": True}, "`max_new_tokens` must be an integer"),
        ([[1, 2]], {"top_k": 0}, r"`top_k` must be an integer >= 1 or None; received 0"),
        ([[1, 2]], {"seed": 2**31}, r"`seed` must be an integer in \[0, 2147483648\)"),
        ([[1, 2]], {"seed": 2**32}, r"`seed` must be an integer in \[0, 2147483648\)"),
        ([[1, 2]], {"seed": -1}, r"`seed` must be an integer"),
        ([[1, 2]], {"stop_token_id": 23}, r"`stop_token_id` must be an integer in \[0, 23\)"),
        ([[1, 2, 23]], {}, r"token id 23 at \[0, 2\], outside the vocabulary .*vocabulary_size=23"),
        ([[1, 2], [3, -1]], {}, r"`prompts` holds token id -1 at \[1, 1\].*vocabulary_size=23"),
    ],
)
def test_generate_checks_its_arguments(lm, prompts, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(lm, prompts, **kwargs)


def test_softmax_lm_cannot_run_as_rnn():
    model = build_causal_lm(9, sequence_length=8, hidden_dim=8, num_heads=2, attention="softmax")
    with pytest.raises(ValueError, match="cannot run as an RNN"):
        RecurrentLM(model)


def test_recurrent_lm_knows_its_vocabulary_size(lm):
    assert RecurrentLM(lm).vocabulary_size == 23


def test_generate_accepts_numpy_integers(lm):
    ints = dict(top_k=3, seed=5, stop_token_id=4)
    expected = generate(lm, [[1, 2, 3]], 6, temperature=1.0, **ints)
    as_numpy = {k: np.int64(v) for k, v in ints.items()}
    out = generate(lm, [[1, 2, 3]], np.int32(6), temperature=1.0, **as_numpy)
    np.testing.assert_array_equal(out, expected)


def test_largest_seed_is_not_the_same_as_seed_zero(lm):
    sample = lambda seed: generate(lm, [[1, 2, 3]], 15, temperature=1.0, seed=seed)
    assert not np.array_equal(sample(2**31 - 1), sample(0))


def test_step_traces_once_whatever_the_index(lm):
    """A Python int index must not retrace (and, under XLA, recompile) per token."""
    runner = RecurrentLM(lm)
    _, states = runner.prefill([[1, 2, 3]])
    for index in (3, 4, 5, 6, np.int64(7), tf.constant(8)):
        _, states = runner.step([1], states, index)
    assert runner._step_fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("position", ["learned", "none"])
@pytest.mark.parametrize("index", [-1, 64])
def test_step_refuses_an_index_outside_the_positions(position, index):
    model = build_causal_lm(23, sequence_length=64, hidden_dim=16, num_heads=2, position=position)
    runner = RecurrentLM(model)
    _, states = runner.prefill([[1, 2, 3]])
    if position == "none" and index == 64:
        runner.step([1], states, index)  # no position table: no upper bound
        return
    with pytest.raises(ValueError, match=rf"`index` must lie in \[0, .*received {index}"):
        runner.step([1], states, index)


def _embedding(kind):
    layer = PositionEmbedding(16) if kind == "learned" else SinusoidalPositionEmbedding()
    layer(np.ones((1, 2, 8), "float32"))
    return layer


@pytest.mark.parametrize("kind, start", [("learned", -1), ("learned", 15), ("sinusoidal", -1)])
def test_position_embedding_refuses_a_static_start_outside_the_table(kind, start):
    with pytest.raises(ValueError, match=rf"`start_index`={start} with sequence length 2"):
        _embedding(kind)(np.ones((1, 2, 8), "float32"), start_index=start)


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("kind, start", [("learned", -1), ("learned", 16), ("sinusoidal", -1)])
def test_position_embedding_refuses_a_tensor_start_outside_the_table(kind, start, mode):
    """Raises eagerly, asserts in graphs, and gives NaN under XLA (no asserts)."""
    layer = _embedding(kind)
    fn = in_mode(lambda i: layer(tf.ones((1, 1, 8)), start_index=i), mode)
    assert np.all(np.isfinite(fn(tf.constant(0))))
    if mode == "xla":
        assert np.all(np.isnan(fn(tf.constant(start))))
        return
    error = ValueError if mode == "eager" else tf.errors.InvalidArgumentError
    limit = "16" if kind == "learned" else "inf"
    with pytest.raises(error, match=rf"`start_index`.*\[0, {limit}\) \(sequence_length="):
        fn(tf.constant(start))
