"""Autoregressive generation with the recurrent (RNN) form of causal linear attention."""

from keras_linear_attention.generation.generate import generate
from keras_linear_attention.generation.recurrent_lm import RecurrentLM

__all__ = ["RecurrentLM", "generate"]
