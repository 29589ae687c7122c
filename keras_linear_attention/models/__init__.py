"""Functional model builders."""

from keras_linear_attention.models.causal_lm import build_causal_lm
from keras_linear_attention.models.sequence_classifier import build_sequence_classifier

__all__ = ["build_causal_lm", "build_sequence_classifier"]
