"""TFDS pipelines: shapes under mock data, and real Fashion-MNIST prepared offline."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import needs_debian_data

from keras_linear_attention import build_sequence_classifier
from keras_linear_attention.datasets import fashion_mnist, pipelines


def _classifier(patch):
    return build_sequence_classifier(
        10,
        feature_dim=patch * patch,
        sequence_length=(28 // patch) ** 2,
        hidden_dim=32,
        dropout=0.0,
    )


@pytest.mark.parametrize("patch", [4, 7])
def test_pipeline_shapes_and_fit_under_mock_data(patch):
    with tfds.testing.mock_data(num_examples=48):
        ds = tfds.load("fashion_mnist", split="train", as_supervised=True)
    batches = pipelines.patch_classification(ds, patch, batch_size=16, training=True)
    x, y = next(iter(batches))
    assert x.shape == (16, (28 // patch) ** 2, patch * patch) and x.dtype == tf.float32
    assert y.dtype == tf.int64 and float(tf.reduce_max(x)) <= 1.0
    model = _classifier(patch)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(batches, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_patches_keep_pixels_in_order():
    image = tf.reshape(tf.range(28 * 28, dtype=tf.int32) % 256, (28, 28, 1))
    patches = pipelines.image_to_patches(tf.cast(image, tf.uint8), 7)
    expected = image[7:14, 14:21, 0] / 255  # patch (row 1, col 2) is sequence position 6
    np.testing.assert_allclose(tf.reshape(patches[6], (7, 7)), expected, atol=1e-6)


def test_missing_local_files_are_named(tmp_path):
    builder = fashion_mnist.LocalFashionMNIST(data_dir=str(tmp_path), source_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=fashion_mnist.DEBIAN_PACKAGE):
        builder.download_and_prepare()
    assert not fashion_mnist.prepare_offline(str(tmp_path / "d"), source_dir=str(tmp_path))


@needs_debian_data
def test_prepared_data_loads_with_plain_tfds(fashion_mnist_dir):
    real_data_dir = fashion_mnist_dir
    builder = tfds.builder("fashion_mnist", data_dir=real_data_dir)
    assert builder.info.splits["train"].num_examples == 60_000
    assert builder.info.splits["test"].num_examples == 10_000
    image, label = next(
        iter(tfds.load("fashion_mnist", split="test", data_dir=real_data_dir, as_supervised=True))
    )
    assert image.shape == (28, 28, 1) and 0 <= int(label) < 10
    assert int(tf.reduce_max(image)) > 100  # real pixels, not mock noise


@needs_debian_data
def test_fit_learns_on_real_data(fashion_mnist_dir):
    real_data_dir = fashion_mnist_dir
    keras.utils.set_random_seed(0)
    load = lambda split: tfds.load(
        "fashion_mnist", split=split, data_dir=real_data_dir, as_supervised=True, download=False
    )
    train = pipelines.patch_classification(load("train[:6000]"), 7, 32, training=True)
    test = pipelines.patch_classification(load("test[:1000]"), 7, 250, training=False)
    model = _classifier(7)
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train, epochs=2, verbose=0)  # 376 steps
    _, accuracy = model.evaluate(test, verbose=0)
    assert accuracy > 0.65, accuracy  # chance is 0.10


def test_hypermodel_searches_and_reloads_under_mock_data(tmp_path):
    kt = pytest.importorskip("keras_tuner")
    from keras_linear_attention.tuning import ClassifierHyperModel

    with tfds.testing.mock_data(num_examples=32):
        ds = tfds.load("fashion_mnist", split="train", as_supervised=True)
    data = pipelines.patch_classification(ds, 7, 16, training=False)
    tuner = kt.RandomSearch(
        ClassifierHyperModel(10, feature_dim=49, sequence_length=16),
        objective="val_accuracy",
        max_trials=3,
        seed=1,
        directory=str(tmp_path),
    )
    space = {hp.name: hp for hp in tuner.oracle.hyperparameters.space}
    assert set(space["feature_map"].values) == {"elu", "relu", "favor"}
    assert {"num_heads", "num_layers", "hidden_dim", "learning_rate"} <= set(space)
    tuner.search(data, validation_data=data, epochs=1, verbose=0)
    assert len(tuner.oracle.trials) == 3
    best = tuner.get_best_models(1)[0]
    again = tuner.get_best_models(1)[0]
    x = next(iter(data))[0]
    np.testing.assert_allclose(best(x), again(x), atol=1e-6)
    _, accuracy = best.evaluate(data, verbose=0)
    assert abs(accuracy - tuner.oracle.get_best_trials(1)[0].score) < 1e-6
