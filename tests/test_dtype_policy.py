"""A per-layer dtype policy reaches every sublayer.

`dtype="mixed_bfloat16"` (or `"mixed_float16"`) on an attention layer, a
block or a model builder, with the global policy left at float32: every
sublayer (φ, projections, gates, short convolutions, norms, feed-forward,
dropout) has the same policy, the variables stay float32, the output is in
the compute dtype (recurrent states in float32), and the output is finite and
close to the float32 layer's with the same weights.
"""

import keras
import numpy as np
import pytest

import keras_linear_attention as kla
from keras_linear_attention.blocks import LinearTransformerDecoder, LinearTransformerEncoder
from keras_linear_attention.models import build_causal_lm, build_sequence_classifier

POLICIES = ["mixed_bfloat16", "mixed_float16"]
# Max abs error relative to the largest float32 output: bfloat16 keeps 8
# mantissa bits, float16 11.
TOLERANCE = {"mixed_bfloat16": 0.1, "mixed_float16": 0.02}
DIM, LENGTH = 16, 12

RECURRENCE_LAYERS = {
    f"causal_{r}": (
        kla.CausalLinearAttention,
        {"num_heads": 2, "key_dim": 8, "recurrence": r, "use_gate": True}
        | ({} if r == "linear" else {"conv_size": 3}),
        "self",
    )
    for r in ("linear", "retention", "gated", "delta", "gated_delta")
}
LAYERS = {
    "mha": (kla.LinearMultiHeadAttention, {"num_heads": 2, "key_dim": 8, "use_gate": True}, "mha"),
    "mha_favor_causal": (
        kla.LinearMultiHeadAttention,
        {"num_heads": 2, "key_dim": 8, "feature_map": "favor"},
        "mha_causal",
    ),
    **RECURRENCE_LAYERS,
    "encoder": (LinearTransformerEncoder, {"num_heads": 2, "intermediate_dim": 32}, "block"),
    "encoder_softmax": (
        LinearTransformerEncoder,
        {"num_heads": 2, "intermediate_dim": 32, "attention": "softmax"},
        "block",
    ),
    "decoder_cross": (LinearTransformerDecoder, {"num_heads": 2, "intermediate_dim": 32}, "cross"),
    "decoder_gated_delta": (
        LinearTransformerDecoder,
        {"num_heads": 2, "intermediate_dim": 32, "attention": "gated_delta", "conv_size": 3},
        "self",
    ),
}


def _inputs(rng):
    return (
        rng.normal(size=(2, LENGTH, DIM)).astype("float32"),
        rng.normal(size=(2, 7, DIM)).astype("float32"),
    )


def _call(layer, how, x, encoder_outputs):
    """`(output, state)`; the state is None for the layers that keep none."""
    if how == "mha":
        out, state = layer(x, x), None
    elif how == "mha_causal":
        out, state = layer(x, x, use_causal_mask=True), None
    elif how == "self":
        out, state = layer(x, return_state=True)
    elif how == "cross":
        out, state = layer(x, encoder_outputs=encoder_outputs, return_state=True)
    else:
        out, state = layer(x), None
    return out, state


def transformer_block(layer):
    return list(layer._flatten_layers(include_self=False, recursive=True))


def _float32_twin(layer):
    """The same layer with the float32 policy and the same weights."""
    return type(layer).from_config({**layer.get_config(), "dtype": "float32"})


def _check_policy_is_passed_down(layer, policy):
    assert layer.dtype_policy.name == policy
    subs = transformer_block(layer)
    assert subs, "no sublayers found"
    wrong = {s.path or s.name: s.dtype_policy.name for s in subs if s.dtype_policy.name != policy}
    assert not wrong, wrong
    floats = [v for v in layer.variables if "float" in str(v.dtype)]
    assert floats and all(v.dtype == "float32" for v in floats), {v.path: v.dtype for v in floats}
    assert keras.config.dtype_policy().name == "float32"  # the global policy is untouched


def _relative_error(actual, expected):
    actual = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(actual, "float32")))
    expected = np.asarray(keras.ops.convert_to_numpy(expected))
    assert np.all(np.isfinite(actual)), "non-finite values"
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_policy_reaches_every_sublayer(rng, case, policy):
    cls, kwargs, how = LAYERS[case]
    x, encoder_outputs = _inputs(rng)
    layer = cls(**kwargs, dtype=policy)
    out, state = _call(layer, how, x, encoder_outputs)
    _check_policy_is_passed_down(layer, policy)
    compute = policy.split("_")[1]
    assert out.dtype == compute
    if state is not None:  # recurrent states are float32 whatever the policy
        assert all(s.dtype == "float32" for s in state)

    twin = _float32_twin(layer)
    _call(twin, how, x, encoder_outputs)
    twin.set_weights(layer.get_weights())
    expected, expected_state = _call(twin, how, x, encoder_outputs)
    assert _relative_error(out, expected) < TOLERANCE[policy]
    for s, e in zip(state or (), expected_state or (), strict=True):
        assert _relative_error(s, e) < TOLERANCE[policy]

    # The policy survives a config round trip, sublayers included.
    clone = cls.from_config(layer.get_config())
    _call(clone, how, x, encoder_outputs)
    _check_policy_is_passed_down(clone, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_feature_map_instance_takes_the_policy_of_its_layer(policy):
    """A φ instance given to a block takes the block's policy at once, so the
    block's config is the same before and after build."""
    phi = kla.feature_maps.FavorFeatureMap(num_features=16, seed=1)
    block = LinearTransformerDecoder(32, 2, feature_map=phi, dtype=policy)
    config = block.get_config()
    assert phi.dtype_policy.name == policy
    block(np.ones((1, 3, DIM), "float32"))
    assert block.self_attention.feature_map is phi and phi.dtype_policy.name == policy
    assert block.get_config() == config


@pytest.mark.parametrize(
    "build, inputs",
    [
        (
            lambda dtype: build_causal_lm(
                19, sequence_length=16, hidden_dim=16, num_heads=2, dtype=dtype
            ),
            np.arange(20).reshape(2, 10) % 19,
        ),
        (
            lambda dtype: build_sequence_classifier(
                3, feature_dim=DIM, sequence_length=16, hidden_dim=16, num_heads=2, dtype=dtype
            ),
            np.linspace(-1, 1, 2 * 10 * DIM, dtype="float32").reshape(2, 10, DIM),
        ),
    ],
    ids=["causal_lm", "sequence_classifier"],
)
def test_model_builders_pass_the_policy_to_every_layer_but_the_head(build, inputs):
    policy = "mixed_bfloat16"
    model = build(policy)
    head = model.layers[-1]
    assert head.dtype_policy.name == "float32"  # the logits stay float32
    body = model.layers[1:-1]  # after the input layer, before the head
    layers = body + [s for layer in body for s in transformer_block(layer)]
    wrong = {s.name: s.dtype_policy.name for s in layers if s.dtype_policy.name != policy}
    assert not wrong, wrong
    out = model(inputs)
    assert out.dtype == "float32"
    reference = build(None)
    reference.set_weights(model.get_weights())
    assert _relative_error(out, reference(inputs)) < TOLERANCE[policy]
    assert keras.config.dtype_policy().name == "float32"
