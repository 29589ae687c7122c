"""keras-hub's Transformer blocks with linear attention (`kla.hub`), against
the float64 reference, keras-hub's own blocks and the shared layer checks."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, assert_close, in_mode
from layer_test_case import run_layer_test
from reference import hub_block_reference, layer_reference, layer_weights

keras_hub = pytest.importorskip("keras_hub")
from keras_hub.src.layers.modeling.transformer_layer_utils import (  # noqa: E402
    compute_causal_mask,
    merge_padding_and_attention_mask,
)

from keras_linear_attention import hub  # noqa: E402

B, T, DIM, HEADS, FF = 2, 7, 8, 2, 16
TOL = dict(rtol=2e-4, atol=2e-5)
# Right padding, as keras-hub's preprocessors make it.
PADDING = np.array([[1] * T, [1] * (T - 2) + [0, 0]], bool)


def _x(rng, *shape):
    return tf.constant(rng.normal(size=shape), tf.float32)


def _randomize(layer, rng):
    """Weights away from keras-hub's init (zero biases, unit norms)."""
    layer.set_weights([rng.normal(0, 0.4, w.shape).astype("float32") for w in layer.weights])


def _built(cls, rng, x, encoder=None, **kwargs):
    block = cls(intermediate_dim=FF, num_heads=HEADS, **kwargs)
    block(x) if encoder is None else block(x, encoder)
    _randomize(block, rng)
    return block


@pytest.mark.parametrize("mode", MODES)
def test_attention_with_keras_hubs_causal_padding_mask_matches_reference(rng, mode):
    layer = hub.LinearCachedMultiHeadAttention(num_heads=HEADS, key_dim=4)
    x = _x(rng, B, T, DIM)
    layer(x, x)
    _randomize(layer, rng)
    padding = merge_padding_and_attention_mask(x, PADDING, None)
    mask = tf.logical_and(tf.cast(padding, bool), tf.cast(compute_causal_mask(B, T, T), bool))
    call = in_mode(lambda x: layer(x, x, attention_mask=mask), mode)
    expected = layer_reference(layer_weights(layer), x, x, causal=True, key_mask=PADDING)
    assert_close(f"hub attention {mode}", call(x), expected, **TOL)


@pytest.mark.parametrize("normalize_first", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_decoder_matches_reference_forward_and_gradient(rng, mode, normalize_first):
    x = _x(rng, B, T, DIM)
    decoder = _built(hub.TransformerDecoder, rng, x, normalize_first=normalize_first)
    cotangent = _x(rng, B, T, DIM)

    def loss_and_grad(fn, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fn(x)
            loss = tf.reduce_sum(out * tf.cast(cotangent, out.dtype))
        return out, tape.gradient(loss, x)

    ours = in_mode(
        lambda x: loss_and_grad(lambda y: decoder(y, decoder_padding_mask=PADDING), x), mode
    )
    out, grad = ours(x)
    ref_out, ref_grad = loss_and_grad(
        lambda y: hub_block_reference(decoder, y, causal=True, key_mask=PADDING),
        tf.cast(x, tf.float64),
    )
    assert_close(f"hub decoder {mode}", out, ref_out, **TOL)
    assert_close(f"hub decoder grad {mode}", grad, ref_grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_encoder_matches_reference(rng, mode):
    x = _x(rng, B, T, DIM)
    encoder = _built(hub.TransformerEncoder, rng, x)
    call = in_mode(lambda x: encoder(x, padding_mask=PADDING), mode)
    expected = hub_block_reference(encoder, x, key_mask=PADDING)
    assert_close(f"hub encoder {mode}", call(x), expected, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_decoder_prefill_then_steps_equal_parallel(rng, mode):
    x, memory = _x(rng, B, T, DIM), _x(rng, B, 4, DIM)
    decoder = _built(hub.TransformerDecoder, rng, x, encoder=memory)
    parallel = decoder(x, memory)
    cross_cache = tf.zeros((B, 2, 4, HEADS, 4))  # keras-hub's K/V layout; passed through

    def call(x, state):
        return decoder(x, memory, self_attention_cache=state, cross_attention_cache=cross_cache)

    call = in_mode(call, mode)
    out, state, cross = call(x[:, :3], decoder.get_initial_state(B))
    outs = [out]
    for t in range(3, T):
        out, state, cross = call(x[:, t : t + 1], state)
        outs.append(out)
    assert_close(f"hub decoder steps {mode}", tf.concat(outs, 1), parallel, **TOL)
    np.testing.assert_array_equal(cross, cross_cache)


@pytest.mark.parametrize(
    "ours, theirs, encoder",
    [
        (hub.TransformerDecoder, keras_hub.layers.TransformerDecoder, False),
        (hub.TransformerDecoder, keras_hub.layers.TransformerDecoder, True),
        (hub.TransformerEncoder, keras_hub.layers.TransformerEncoder, False),
    ],
    ids=["decoder", "decoder_cross", "encoder"],
)
def test_softmax_blocks_weights_load_in_the_same_order(rng, ours, theirs, encoder):
    x = _x(rng, B, T, DIM)
    args = (x, _x(rng, B, 4, DIM)) if encoder else (x,)
    softmax, linear = theirs(FF, HEADS), ours(FF, HEADS)
    softmax(*args), linear(*args)
    _randomize(softmax, rng)
    assert [w.path.split("/", 1)[1] for w in linear.weights] == [
        w.path.split("/", 1)[1] for w in softmax.weights
    ]
    linear.set_weights(softmax.get_weights())
    for a, b in zip(linear.weights, softmax.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("cls", [hub.TransformerDecoder, hub.TransformerEncoder])
def test_shared_layer_checks(tmp_path, cls):
    run_layer_test(
        cls,
        {"intermediate_dim": FF, "num_heads": HEADS, "feature_map": "hedgehog", "eps": 1e-5},
        (B, T, DIM),
        (B, T, DIM),
        run_build=False,  # keras-hub's blocks build from the first call's shapes
        tmp_path=tmp_path,
    )


def test_bad_calls_are_named(rng):
    decoder = hub.TransformerDecoder(FF, HEADS)
    with pytest.raises(ValueError, match="before `get_initial_state`"):
        decoder.get_initial_state(1)
    x = _x(rng, 1, 3, DIM)
    layer = hub.LinearCachedMultiHeadAttention(num_heads=HEADS, key_dim=4)
    with pytest.raises(ValueError, match="`return_attention_scores=True` is not available"):
        layer(
            x,
            x,
            cache=(tf.zeros((1, HEADS, 4, 4)), tf.zeros((1, HEADS, 4))),
            return_attention_scores=True,
        )
