"""keras-linear-attention: attention in linear time for Keras 3.

"Transformers are RNNs" (Katharopoulos et al., ICML 2020): kernel attention
`φ(Q)(φ(K)ᵀV)` in O(N), causal attention with prefix sums, and the same
prefix sums as an RNN state for constant-cost generation.
"""

from keras_linear_attention import feature_maps, ops
from keras_linear_attention.blocks import LinearTransformerDecoder, LinearTransformerEncoder
from keras_linear_attention.feature_maps import (
    CallableFeatureMap,
    EluFeatureMap,
    FavorFeatureMap,
    FeatureMap,
    HedgehogFeatureMap,
    ReluFeatureMap,
    TaylorFeatureMap,
)
from keras_linear_attention.generation import RecurrentLM, generate
from keras_linear_attention.layers import (
    CausalLinearAttention,
    LinearMultiHeadAttention,
    PositionEmbedding,
    ShortConvolution,
    SinusoidalPositionEmbedding,
)
from keras_linear_attention.linearize import attention_transfer, linearize
from keras_linear_attention.models import build_causal_lm, build_sequence_classifier
from keras_linear_attention.ops import (
    causal_linear_attention,
    kernel_attention_scores,
    linear_attention,
    linear_attention_step,
    recurrent_linear_attention,
)
from keras_linear_attention.weights import load_mha_weights

__version__ = "0.1.0"

__all__ = [
    "CallableFeatureMap",
    "CausalLinearAttention",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "HedgehogFeatureMap",
    "LinearMultiHeadAttention",
    "LinearTransformerDecoder",
    "LinearTransformerEncoder",
    "PositionEmbedding",
    "RecurrentLM",
    "ReluFeatureMap",
    "ShortConvolution",
    "SinusoidalPositionEmbedding",
    "TaylorFeatureMap",
    "attention_transfer",
    "build_causal_lm",
    "build_sequence_classifier",
    "causal_linear_attention",
    "feature_maps",
    "generate",
    "kernel_attention_scores",
    "linear_attention",
    "linear_attention_step",
    "linearize",
    "load_mha_weights",
    "ops",
    "recurrent_linear_attention",
]
