"""Real data through TFDS (offline-capable builders) and `tf.data` pipelines."""

from keras_linear_attention.datasets import fashion_mnist, pipelines

__all__ = ["fashion_mnist", "pipelines"]
