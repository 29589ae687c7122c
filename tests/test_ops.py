"""The pure math against the explicit float64 reference: forward and gradients."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode
from reference import causal_attention_with_state, elu_plus_one, kernel_attention

import keras_linear_attention as kla

H, D, M = 2, 4, 3


def _inputs(rng, t, s=None, batch=2, dtype="float32"):
    s = t if s is None else s
    q = elu_plus_one(tf.constant(rng.normal(size=(batch, t, H, D)), tf.float64))
    k = elu_plus_one(tf.constant(rng.normal(size=(batch, s, H, D)), tf.float64))
    v = tf.constant(rng.normal(size=(batch, s, H, M)), tf.float64)
    return [tf.cast(x, dtype) for x in (q, k, v)]


def _padding(rng, batch, s):
    mask = rng.random((batch, s)) > 0.3
    mask[:, 0] = True  # at least one visible key per row
    return tf.constant(mask)


def _grads(fn, q, k, v, mask):
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = fn(q, k, v, mask)
        # A fixed random cotangent checks the full Jacobian-vector product.
        w = tf.cast(tf.sin(tf.range(tf.size(out), dtype=tf.float64) * 1.3), out.dtype)
        loss = tf.reduce_sum(out * tf.reshape(w, tf.shape(out)))
    return [out, *tape.gradient(loss, [q, k, v])]


def _cotangent(t):
    """A fixed, non-constant cotangent shaped like `t`."""
    return tf.reshape(tf.cos(tf.range(tf.size(t), dtype=t.dtype) * 0.7), tf.shape(t))


def _check(name, ours, ref, dtype):
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == "float32" else dict(rtol=1e-9, atol=1e-10)
    for label, a, b in zip(["out", "dq", "dk", "dv"], ours, ref, strict=True):
        assert_close(f"{name} {label} ({dtype})", a, b, **tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t,s", [(1, 1), (7, 7), (64, 64), (5, 9), (9, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_noncausal_matches_reference(rng, mode, t, s, masked):
    q, k, v = _inputs(rng, t, s)
    mask = _padding(rng, 2, s) if masked else None
    fn = in_mode(lambda q, k, v, m: kla.linear_attention(q, k, v, key_mask=m), mode)
    ref = lambda q, k, v, m: kernel_attention(q, k, v, key_mask=m)
    ours = _grads(fn, q, k, v, mask)
    expected = _grads(ref, *(tf.cast(x, tf.float64) for x in (q, k, v)), mask)
    _check("noncausal", ours, expected, "float32")


@pytest.mark.parametrize("mode", MODES)
# (300, 4) has 75 chunks: several blocks of the blocked prefix sum, the last one padded.
@pytest.mark.parametrize("n,chunk", [(1, 64), (7, 4), (64, 16), (65, 16), (300, 4), (1000, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_causal_matches_reference(rng, mode, n, chunk, masked):
    q, k, v = _inputs(rng, n, batch=1 if n == 1000 else 2)
    mask = _padding(rng, q.shape[0], n) if masked else None
    fn = in_mode(
        lambda q, k, v, m: kla.causal_linear_attention(
            q, k, v, key_mask=m, chunk_size=chunk, short_sequence_threshold=0
        ),
        mode,
    )
    ref = lambda q, k, v, m: kernel_attention(q, k, v, key_mask=m, causal=True)
    ours = _grads(fn, q, k, v, mask)
    expected = _grads(ref, *(tf.cast(x, tf.float64) for x in (q, k, v)), mask)
    _check("causal", ours, expected, "float32")


@pytest.mark.parametrize("causal", [False, True])
def test_float64_inputs_are_exact(rng, causal):
    q, k, v = _inputs(rng, 37, dtype="float64")
    mask = _padding(rng, 2, 37)
    if causal:
        fn = lambda q, k, v, m: kla.causal_linear_attention(
            q, k, v, m, chunk_size=8, short_sequence_threshold=0
        )
    else:
        fn = lambda q, k, v, m: kla.linear_attention(q, k, v, m)
    ref = lambda q, k, v, m: kernel_attention(q, k, v, key_mask=m, causal=causal)
    _check(
        "causal" if causal else "noncausal",
        _grads(fn, q, k, v, mask),
        _grads(ref, q, k, v, mask),
        "float64",
    )


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 512])
def test_causal_result_does_not_depend_on_chunk_size(rng, chunk):
    q, k, v = _inputs(rng, 100, dtype="float64")
    out = kla.causal_linear_attention(q, k, v, chunk_size=chunk, short_sequence_threshold=0)
    assert_close(
        "causal chunk sweep (float64)",
        out,
        kernel_attention(q, k, v, causal=True),
        rtol=1e-10,
        atol=1e-11,
    )


@pytest.mark.parametrize("mode", MODES)
def test_recurrent_equals_chunked_equals_reference(rng, mode):
    q, k, v = _inputs(rng, 23)
    mask = _padding(rng, 2, 23)
    chunked = in_mode(
        lambda q, k, v, m: kla.causal_linear_attention(
            q, k, v, m, chunk_size=8, short_sequence_threshold=0, return_state=True
        ),
        mode,
    )
    recurrent = in_mode(
        lambda q, k, v, m: kla.recurrent_linear_attention(q, k, v, key_mask=m), mode
    )
    out_c, state_c = chunked(q, k, v, mask)
    out_r, state_r = recurrent(q, k, v, mask)
    ref = kernel_attention(q, k, v, key_mask=mask, causal=True)
    assert_close("recurrent (scan) vs reference", out_r, ref, rtol=1e-4, atol=2e-5)
    assert_close("chunked vs recurrent", out_c, out_r, rtol=1e-4, atol=2e-5)
    for a, b in zip(state_c, state_r, strict=True):
        assert_close("final state chunked vs recurrent", a, b, rtol=1e-5, atol=1e-5)
    # The state is exactly the masked sums it stands for.
    phi_k = k * tf.cast(mask, k.dtype)[:, :, None, None]
    assert_close(
        "final state vs sums",
        state_c[0],
        tf.einsum("bshd,bshm->bhdm", phi_k, v),
        rtol=1e-5,
        atol=1e-5,
    )
    assert_close("final state vs sums", state_c[1], tf.reduce_sum(phi_k, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prompt", [1, 13, 32])
def test_prefill_then_steps_equals_parallel(rng, mode, prompt):
    n = 40
    q, k, v = _inputs(rng, n)
    prefill = in_mode(
        lambda q, k, v: kla.causal_linear_attention(
            q, k, v, chunk_size=16, short_sequence_threshold=0, return_state=True
        ),
        mode,
    )
    step = in_mode(lambda q, k, v, s: kla.linear_attention_step(q, k, v, s), mode)
    out, state = prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt])
    outs = [out]
    for t in range(prompt, n):
        o, state = step(q[:, t], k[:, t], v[:, t], state)
        outs.append(o[:, None])
    ref = kernel_attention(q, k, v, causal=True)
    assert_close("prefill+step vs reference", tf.concat(outs, 1), ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,chunk", [(1, 4), (37, 8), (64, 64), (130, 16)])
def test_state_in_and_out_gradients_match_reference(rng, mode, n, chunk):
    """Gradients reach q, k, v and the initial state, also through the final
    state (a loss on it, as truncated backprop through time has)."""
    q, k, v = _inputs(rng, n)
    initial_kv = tf.constant(rng.random((2, H, D, M)), tf.float32)
    initial_k_sum = tf.constant(rng.random((2, H, D)), tf.float32)
    mask = _padding(rng, 2, n)

    def ours(q, k, v, initial_kv, initial_k_sum):
        return kla.causal_linear_attention(
            q,
            k,
            v,
            mask,
            initial_state=(initial_kv, initial_k_sum),
            chunk_size=chunk,
            short_sequence_threshold=0,
            return_state=True,
        )

    def ref(q, k, v, initial_kv, initial_k_sum):
        return causal_attention_with_state(q, k, v, initial_kv, initial_k_sum, key_mask=mask)

    def values_and_grads(fn, *args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            out, state = fn(*args)
            loss = sum(tf.reduce_sum(t * _cotangent(t)) for t in (out, *state))
        return [out, *state, *tape.gradient(loss, list(args))]

    args = (q, k, v, initial_kv, initial_k_sum)
    got = in_mode(lambda *a: values_and_grads(ours, *a), mode)(*args)
    expected = values_and_grads(ref, *(tf.cast(x, tf.float64) for x in args))
    names = ["out", "kv", "k_sum", "dq", "dk", "dv", "d initial_kv", "d initial_k_sum"]
    for name, a, b in zip(names, got, expected, strict=True):
        assert_close(f"causal with state {name}", a, b, rtol=1e-4, atol=5e-5)


def test_initial_state_continues_a_sequence(rng):
    """Chunked attention over two halves, the second seeded with the first's state."""
    q, k, v = _inputs(rng, 50)
    first, state = kla.causal_linear_attention(q[:, :20], k[:, :20], v[:, :20], return_state=True)
    second = kla.causal_linear_attention(
        q[:, 20:],
        k[:, 20:],
        v[:, 20:],
        initial_state=state,
        chunk_size=8,
        short_sequence_threshold=0,
    )
    ref = kernel_attention(q, k, v, causal=True)
    assert_close(
        "split sequence via initial_state", tf.concat([first, second], 1), ref, rtol=1e-4, atol=2e-5
    )


def test_dynamic_shapes_under_xla(rng):
    """One XLA function serves different batch sizes and lengths (not chunk multiples)."""
    spec = [
        tf.TensorSpec((None, None, H, D)),
        tf.TensorSpec((None, None, H, D)),
        tf.TensorSpec((None, None, H, M)),
    ]
    fn = tf.function(
        lambda q, k, v: kla.causal_linear_attention(
            q, k, v, chunk_size=16, short_sequence_threshold=0
        ),
        jit_compile=True,
        input_signature=spec,
    )
    for batch, n in [(1, 1), (3, 17), (2, 48)]:
        q, k, v = _inputs(rng, n, batch=batch)
        assert_close(
            "causal dynamic shapes (xla)",
            fn(q, k, v),
            kernel_attention(q, k, v, causal=True),
            rtol=1e-4,
            atol=2e-5,
        )


def test_kernel_attention_scores_reproduce_output(rng):
    q, k, v = _inputs(rng, 12, 9)
    mask = _padding(rng, 2, 9)
    scores = kla.kernel_attention_scores(q, k, key_mask=mask)
    out = tf.einsum("bhts,bshm->bthm", scores, tf.cast(v, scores.dtype))
    assert_close(
        "scores @ v vs linear_attention",
        out,
        kla.linear_attention(q, k, v, mask),
        rtol=1e-5,
        atol=1e-6,
    )
    assert np.all(np.asarray(scores)[..., ~np.asarray(mask)[0]][0] == 0)


def test_zero_feature_rows_give_zero_not_nan():
    """relu can zero a whole φ row: the eps keeps the output defined (0)."""
    q = tf.zeros((1, 4, H, D))
    k = tf.ones((1, 4, H, D))
    v = tf.ones((1, 4, H, M))
    for out in (kla.linear_attention(q, k, v), kla.causal_linear_attention(q, k, v)):
        np.testing.assert_array_equal(out.numpy(), 0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 300, 4100])
def test_exclusive_prefix_sum_matches_numpy(rng, mode, n):
    x = rng.normal(size=(3, n, 5))
    fn = in_mode(kla.ops._chunked.exclusive_prefix_sum, mode)
    expected = np.cumsum(x, axis=1) - x
    np.testing.assert_allclose(fn(tf.constant(x)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 300, 4100])
def test_exclusive_suffix_sum_and_offsets_match_numpy(rng, mode, n):
    x, offset = rng.normal(size=(3, n, 5)), rng.normal(size=(3, 5))
    suffix = in_mode(kla.ops._chunked.exclusive_suffix_sum, mode)
    prefix = in_mode(kla.ops._chunked.exclusive_prefix_sum, mode)
    expected = np.cumsum(x[:, ::-1], axis=1)[:, ::-1] - x + offset[:, None]
    np.testing.assert_allclose(suffix(x, offset), expected, rtol=1e-12, atol=1e-12)
    expected = np.cumsum(x, axis=1) - x + offset[:, None]
    np.testing.assert_allclose(prefix(x, offset), expected, rtol=1e-12, atol=1e-12)


def test_backward_never_builds_a_per_token_state():
    """No tensor in the forward+backward graph has the (N, H, D, M) size of a
    per-token state; the largest ones are O(N·C) scores and O(N/C·D·M) states."""
    n, heads, dim = 2048, 2, 32
    spec = tf.TensorSpec((1, n, heads, dim), tf.float32)

    @tf.function
    def fwd_bwd(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(
                kla.causal_linear_attention(q, k, v, chunk_size=64, short_sequence_threshold=0)
            )
        return tape.gradient(loss, [q, k, v])

    graph = fwd_bwd.get_concrete_function(spec, spec, spec).graph
    sizes = [t.shape.num_elements() or 0 for op in graph.get_operations() for t in op.outputs]
    assert len(sizes) > 100  # the gradient ops are in the graph
    per_token_state = n * heads * dim * dim
    assert max(sizes) <= per_token_state // 8, max(sizes)
