"""Keras internals we rely on, in one place.

Keras 3 has no public accessor for the implicit mask attached to a tensor;
its own MultiHeadAttention uses these two helpers.
"""

from keras.src.backend import get_keras_mask, set_keras_mask

__all__ = ["get_keras_mask", "set_keras_mask"]
