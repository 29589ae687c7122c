"""`generate`: prefill in parallel, then decode token by token with the RNN state."""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.generation.recurrent_lm import RecurrentLM


def _select(logits, temperature: float, top_k: int, seed: tuple) -> np.ndarray:
    """Next token ids: greedy when `temperature == 0`, else top-k (0 = all)
    sampling at `temperature`, keyed on `seed = (seed, step)`."""
    if keras.backend.backend() == "tensorflow":
        return _tf_select(logits, temperature, top_k, seed)
    if temperature == 0:
        return ops.convert_to_numpy(ops.argmax(logits, axis=-1)).astype(np.int32)
    k = min(top_k, logits.shape[-1]) if top_k else logits.shape[-1]
    kth = ops.top_k(logits, k)[0][:, -1:]
    masked = ops.where(logits < kth, -np.inf, logits) / temperature
    # One 32-bit key per (seed, step): the multiplier is odd, so distinct
    # seeds never share a key at the same step.
    key = (int(seed[0]) * 1_000_003 + int(seed[1])) % 2**32
    sampled = keras.random.categorical(masked, 1, seed=key)
    return ops.convert_to_numpy(sampled[:, 0]).astype(np.int32)


_TF_SELECT = []  # the compiled TF sampler, built on first use


def _tf_select(logits, temperature, top_k, seed) -> np.ndarray:
    """Stateless TF RNG, XLA-compiled: the same tokens for the same seed."""
    import tensorflow as tf

    if not _TF_SELECT:

        @tf.function(jit_compile=True)
        def select(logits, temperature, top_k, seed):
            vocab = tf.shape(logits)[-1]
            k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
            kth = tf.math.top_k(logits, k).values[:, -1:]
            masked = tf.where(logits < kth, tf.constant(-np.inf, logits.dtype), logits)
            scaled = masked / tf.maximum(temperature, 1e-6)
            sampled = tf.random.stateless_categorical(scaled, 1, seed, dtype=tf.int32)[:, 0]
            greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
            return tf.where(temperature > 0, sampled, greedy)

        _TF_SELECT.append(select)
    args = (tf.constant(float(temperature)), tf.constant(int(top_k)), tf.constant(seed, tf.int32))
    return _TF_SELECT[0](logits, *args).numpy()


def _check_prompts(prompts: np.ndarray, vocabulary_size: int) -> None:
    if prompts.ndim != 2 or prompts.shape[1] == 0 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(
            "`prompts` must be integer token ids shaped (batch, prompt_length>0); "
            f"received {prompts.dtype} {prompts.shape}."
        )
    # The compiled step would clamp or wrap a bad id into a valid embedding.
    bad = np.argwhere((prompts < 0) | (prompts >= vocabulary_size))
    if len(bad):
        row, col = bad[0]
        raise ValueError(
            f"`prompts` holds token id {prompts[row, col]} at [{row}, {col}], outside the "
            f"vocabulary [0, {vocabulary_size}) (vocabulary_size={vocabulary_size})."
        )


def _check_args(runner: RecurrentLM, max_new_tokens, temperature, top_k, seed, stop) -> None:
    _checks.check_int("max_new_tokens", max_new_tokens, 0)
    _checks.check_int("top_k", top_k, 1, allow_none=True)
    _checks.check_int("seed", seed, 0, 2**31)  # the TF sampler takes int32 seeds
    _checks.check_int("stop_token_id", stop, 0, runner.vocabulary_size, allow_none=True)
    real = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not real or not 0 <= temperature < math.inf:
        raise ValueError(f"`temperature` must be a finite number >= 0; received {temperature!r}.")


def _check_length(prompts: np.ndarray, max_new_tokens: int, sequence_length: int | None) -> None:
    total = prompts.shape[1] + max_new_tokens
    if sequence_length is not None and total > sequence_length:
        raise ValueError(
            f"prompt length + max_new_tokens = {total} exceeds the model's learned "
            f"position table (sequence_length={sequence_length})."
        )


def generate(
    model: keras.Model | RecurrentLM,
    prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_token_id: int | None = None,
) -> np.ndarray:
    """Continue each prompt by up to `max_new_tokens` tokens.

    The prompt is prefilled with the parallel chunked algorithm; each new
    token then costs one compiled `step` call whose time and memory do not
    depend on the context length. Greedy by default; `temperature > 0`
    samples (from the `top_k` most likely tokens if given) reproducibly from
    `seed`. Sequences that emit `stop_token_id` are padded with it, and
    decoding ends once every sequence has stopped.

    Args:
        model: A `build_causal_lm` model (or a `RecurrentLM` around one, to
            reuse its compiled functions across calls).
        prompts: `(B, P)` token ids in `[0, vocabulary_size)`, equal-length prompts.
        max_new_tokens: Tokens to add.
        temperature: 0 for greedy decoding.
        top_k: Sample among the k most likely tokens.
        seed: Seed of the sampling, in `[0, 2**31)`.
        stop_token_id: Token that ends a sequence.

    Returns:
        `(B, P + generated)` int32 array, prompts included.

    Example:

    >>> from keras_linear_attention.models import build_causal_lm
    >>> model = build_causal_lm(20, sequence_length=16, hidden_dim=8, num_heads=2)
    >>> generate(model, [[1, 2, 3]], max_new_tokens=4).shape
    (1, 7)
    """
    runner = model if isinstance(model, RecurrentLM) else RecurrentLM(model)
    prompts = np.asarray(prompts)
    _check_args(runner, max_new_tokens, temperature, top_k, seed, stop_token_id)
    _check_prompts(prompts, runner.vocabulary_size)
    _check_length(prompts, max_new_tokens, runner.sequence_length)
    tokens = [prompts.astype(np.int32)]
    if max_new_tokens == 0:
        return tokens[0]
    done = np.zeros(len(prompts), bool)
    logits, states = runner.prefill(tokens[0])
    for i in range(max_new_tokens):
        token = _select(logits, temperature, top_k or 0, (seed, i))
        if stop_token_id is not None:
            token = np.where(done, stop_token_id, token)
            done |= token == stop_token_id
        tokens.append(token[:, None])
        if done.all() or i == max_new_tokens - 1:
            break
        logits, states = runner.step(token, states, prompts.shape[1] + i)
    return np.concatenate(tokens, axis=1)
