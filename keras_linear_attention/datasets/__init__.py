"""Real data through TFDS (offline-capable builders) and `tf.data` pipelines."""

from keras_linear_attention.datasets import fashion_mnist, kjv_bible, pipelines

__all__ = ["fashion_mnist", "kjv_bible", "pipelines"]
