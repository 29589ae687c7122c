"""Every public layer through the shared checks of `layer_test_case.py`:
build, symbolic and eager calls, shape inference, config and `.keras` round
trips, `fit` with `jit_compile=True`, and a per-layer mixed_float16 policy.
A layer's numerics are tested against the float64 reference elsewhere.
"""

import keras
import pytest
from layer_test_case import make_inputs, run_layer_test, run_precision_test

import keras_linear_attention as kla

B, T, S, DIM, HEADS, KEY_DIM = 2, 6, 5, 8, 2, 4
SEQ, MEMORY, HEADED = (B, T, DIM), (B, S, DIM), (B, T, HEADS, KEY_DIM)
ATTENTION = {"num_heads": HEADS, "key_dim": KEY_DIM}
# `fit` with XLA costs 1-8 s a case on 2 cores, so it runs once per set of
# trainable weights and code path; the cases with `run_training=False` below
# say which other case trains the same weights.
HEDGEHOG_SEPARATE = {"num_features": 3, "use_bias": True, "separate_query_key": True}
FEATURE_MAPS = {
    name: name for name in ("elu", "relu", "favor", "taylor", "hedgehog")
} | {  # a config: each layer the base creates gets its own map
    "hedgehog_separate": keras.saving.serialize_keras_object(
        kla.HedgehogFeatureMap(**HEDGEHOG_SEPARATE)
    )
}


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_linear_multi_head_attention(tmp_path, feature_map, causal):
    run_layer_test(
        kla.LinearMultiHeadAttention,
        {**ATTENTION, "feature_map": FEATURE_MAPS[feature_map]},
        {"query": SEQ, "value": SEQ if causal else MEMORY},
        SEQ,
        call_kwargs={"use_causal_mask": causal},
        # A φ adds no weights (Hedgehog's train in the hedgehog_separate case).
        run_training=feature_map in ("elu", "hedgehog_separate"),
        tmp_path=tmp_path,
    )


def test_linear_multi_head_attention_gated_with_key(tmp_path):
    run_layer_test(
        kla.LinearMultiHeadAttention,
        {**ATTENTION, "use_gate": True},
        {"query": SEQ, "value": MEMORY, "key": MEMORY},
        SEQ,
        tmp_path=tmp_path,
    )


RECURRENCES = [
    ("linear", None),
    ("retention", None),
    ("gated", None),
    ("delta", None),
    ("gated_delta", None),
    ("retention", 3),
    ("gated_delta", 3),
]


@pytest.mark.parametrize(
    "recurrence,conv_size", RECURRENCES, ids=[f"{r}-conv{c}" for r, c in RECURRENCES]
)
def test_causal_linear_attention(tmp_path, recurrence, conv_size):
    run_layer_test(
        kla.CausalLinearAttention,
        {**ATTENTION, "recurrence": recurrence, "conv_size": conv_size},
        SEQ,
        SEQ,
        # The short convolution's weights train in test_linear_transformer_decoder.
        run_training=conv_size is None,
        tmp_path=tmp_path,
    )


def test_short_convolution(tmp_path):
    run_layer_test(
        kla.ShortConvolution,
        {"kernel_size": 3},
        HEADED,
        (HEADED, (B, 2, HEADS, KEY_DIM)),  # (output, window of the last K - 1 tokens)
        expected_num_trainable_weights=1,
        tmp_path=tmp_path,
    )


def test_position_embedding(tmp_path):
    run_layer_test(
        kla.PositionEmbedding,
        {"sequence_length": 16},
        SEQ,
        SEQ,
        expected_num_trainable_weights=1,
        tmp_path=tmp_path,
    )


def test_sinusoidal_position_embedding(tmp_path):
    run_layer_test(
        kla.SinusoidalPositionEmbedding,
        {},
        SEQ,
        SEQ,
        expected_num_trainable_weights=0,
        run_training=False,  # no weights
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_linear_transformer_encoder(tmp_path, attention):
    run_layer_test(
        kla.LinearTransformerEncoder,
        {"num_heads": HEADS, "intermediate_dim": 16, "attention": attention},
        SEQ,
        SEQ,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "attention,conv_size,cross",
    [("linear", None, False), ("linear", None, True), ("gated_delta", 3, False)],
    ids=["self", "cross", "gated_delta-conv3"],
)
def test_linear_transformer_decoder(tmp_path, attention, conv_size, cross):
    run_layer_test(
        kla.LinearTransformerDecoder,
        {
            "num_heads": HEADS,
            "intermediate_dim": 16,
            "attention": attention,
            "conv_size": conv_size,
        },
        {"inputs": SEQ, "encoder_outputs": MEMORY} if cross else SEQ,
        SEQ,
        run_training=cross or attention != "linear",  # "cross" trains self-attention too
        tmp_path=tmp_path,
    )


def _taylor_dim(d, compact=False):
    return 1 + d + (d * (d + 1) // 2 if compact else d * d)


FEATURE_MAP_CASES = {
    # name: (class, init kwargs, output features, trainable weights)
    "elu": (kla.EluFeatureMap, {}, KEY_DIM, 0),
    "relu": (kla.ReluFeatureMap, {}, KEY_DIM, 0),
    "favor": (kla.FavorFeatureMap, {"seed": 1}, 2 * KEY_DIM, 0),
    "favor_features": (kla.FavorFeatureMap, {"num_features": 6, "seed": 1}, 6, 0),
    "taylor": (kla.TaylorFeatureMap, {}, _taylor_dim(KEY_DIM), 0),
    "taylor_compact": (kla.TaylorFeatureMap, {"compact": True}, _taylor_dim(KEY_DIM, True), 0),
    "hedgehog": (kla.HedgehogFeatureMap, {}, 2 * KEY_DIM, 1),
    "hedgehog_separate_bias": (kla.HedgehogFeatureMap, HEDGEHOG_SEPARATE, 6, 4),
    "callable": (kla.CallableFeatureMap, {"function": keras.activations.softplus}, KEY_DIM, 0),
}
# Favor, Taylor and Hedgehog compute in float32 also under mixed precision, as
# their docstrings say; their symbolic outputs say so too (`output_dtype`).
FLOAT32_MAPS = {"favor", "favor_features", "taylor", "taylor_compact", "hedgehog"}
FLOAT32_MAPS |= {"hedgehog_separate_bias"}


def _role(kwargs):
    # A map with separate query/key weights needs the role (and then uses one set).
    return {"role": "query"} if kwargs.get("separate_query_key") else None


@pytest.mark.parametrize("name", FEATURE_MAP_CASES)
def test_feature_map(tmp_path, name):
    cls, kwargs, features, trainable = FEATURE_MAP_CASES[name]
    run_layer_test(
        cls,
        kwargs,
        HEADED,
        (B, T, HEADS, features),
        call_kwargs=_role(kwargs),
        expected_num_trainable_weights=trainable,
        # No trainable weights, or (separate maps) one role's weights per call:
        # those train inside the attention layer, test_linear_multi_head_attention.
        run_training=trainable == 1,
        run_precision=False,  # test_feature_map_mixed_precision, below
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("name", FEATURE_MAP_CASES)
def test_feature_map_mixed_precision(name):
    cls, kwargs, *_ = FEATURE_MAP_CASES[name]
    output_dtype = "float32" if name in FLOAT32_MAPS else None
    run_precision_test(cls, kwargs, make_inputs(HEADED), _role(kwargs), output_dtype=output_dtype)


def test_every_public_layer_has_a_case():
    tested = {
        kla.LinearMultiHeadAttention,
        kla.CausalLinearAttention,
        kla.ShortConvolution,
        kla.PositionEmbedding,
        kla.SinusoidalPositionEmbedding,
        kla.LinearTransformerEncoder,
        kla.LinearTransformerDecoder,
        *(cls for cls, *_ in FEATURE_MAP_CASES.values()),
    }
    public = {
        obj
        for name in kla.__all__
        if isinstance(obj := getattr(kla, name), type) and issubclass(obj, keras.layers.Layer)
    }
    assert public - tested == {kla.FeatureMap}  # the abstract base
