"""keras-tuner search spaces (needs `keras-tuner`, in the `examples` and `test` extras)."""

from keras_linear_attention.tuning.classifier_hypermodel import ClassifierHyperModel

__all__ = ["ClassifierHyperModel"]
