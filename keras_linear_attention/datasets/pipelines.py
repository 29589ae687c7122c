"""`tf.data` pipelines that turn TFDS examples into sequences for the models."""

from __future__ import annotations

import tensorflow as tf


def image_to_patches(image: tf.Tensor, patch_size: int) -> tf.Tensor:
    """`(H, W, C)` uint8 image → `(H/p * W/p, p*p*C)` float32 patch sequence in [0, 1]."""
    image = tf.cast(image, tf.float32) / 255.0
    patches = tf.image.extract_patches(
        image[None],
        sizes=[1, patch_size, patch_size, 1],
        strides=[1, patch_size, patch_size, 1],
        rates=[1, 1, 1, 1],
        padding="VALID",
    )
    return tf.reshape(patches, (-1, patches.shape[-1]))


def patch_classification(
    dataset: tf.data.Dataset,
    patch_size: int,
    batch_size: int,
    training: bool,
    shuffle_buffer: int = 10_000,
    seed: int | None = 0,
) -> tf.data.Dataset:
    """(image, label) pairs → batches of (patch sequence, label): map, cache,
    shuffle (training only), batch, prefetch.

    Example:

    >>> ds = tf.data.Dataset.from_tensors((tf.zeros((28, 28, 1), tf.uint8), 3))
    >>> next(iter(patch_classification(ds, 4, 1, training=False)))[0].shape
    TensorShape([1, 49, 16])
    """
    dataset = dataset.map(
        lambda image, label: (image_to_patches(image, patch_size), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).cache()
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def char_language_model(
    texts: tf.data.Dataset,
    sequence_length: int,
    batch_size: int,
    training: bool,
    shuffle_buffer: int = 2_000,
    seed: int | None = 0,
) -> tf.data.Dataset:
    """Strings → batches of `(bytes[:-1], bytes[1:])` next-byte prediction pairs.

    Texts are joined with newlines and cut into windows of
    `sequence_length + 1` bytes (vocabulary: 256 byte values).

    Example:

    >>> texts = tf.data.Dataset.from_tensor_slices(["In the beginning"] * 8)
    >>> x, y = next(iter(char_language_model(texts, 16, 2, training=False)))
    >>> x.shape, y.shape
    (TensorShape([2, 16]), TensorShape([2, 16]))
    """
    ids = texts.map(
        lambda t: tf.io.decode_raw(t + "\n", tf.uint8), num_parallel_calls=tf.data.AUTOTUNE
    ).unbatch()
    windows = ids.batch(sequence_length + 1, drop_remainder=True).map(
        lambda w: (tf.cast(w[:-1], tf.int32), tf.cast(w[1:], tf.int32))
    )
    windows = windows.cache()
    if training:
        windows = windows.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return windows.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)
