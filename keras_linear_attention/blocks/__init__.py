"""Transformer blocks for the Keras functional API."""

from keras_linear_attention.blocks.linear_transformer_decoder import LinearTransformerDecoder
from keras_linear_attention.blocks.linear_transformer_encoder import LinearTransformerEncoder

__all__ = ["LinearTransformerDecoder", "LinearTransformerEncoder"]
