"""Keras layers built on the linear-attention math."""

from keras_linear_attention.layers.causal_linear_attention import CausalLinearAttention
from keras_linear_attention.layers.linear_multi_head_attention import LinearMultiHeadAttention
from keras_linear_attention.layers.position_embedding import (
    PositionEmbedding,
    SinusoidalPositionEmbedding,
)
from keras_linear_attention.layers.short_convolution import ShortConvolution

__all__ = [
    "CausalLinearAttention",
    "LinearMultiHeadAttention",
    "PositionEmbedding",
    "ShortConvolution",
    "SinusoidalPositionEmbedding",
]
