"""FAVOR random features are a function of the seed: the same across
processes, across save/load (redraw schedule included) and in exports."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

import keras_linear_attention as kla
from keras_linear_attention.export import export_saved_model
from keras_linear_attention.export.parity import saved_model_errors

ROOT = Path(__file__).resolve().parents[1]


def _model(seed=5, redraw_interval=2):
    fm = kla.FavorFeatureMap(num_features=8, seed=seed, redraw_interval=redraw_interval)
    x = keras.Input((6, 16))
    return keras.Model(x, kla.LinearMultiHeadAttention(2, 8, feature_map=fm)(x, x))


def _favor(model):
    return model.layers[1]._feature_map


def test_same_seed_same_features_in_a_fresh_process(tmp_path):
    keras.utils.set_random_seed(123)  # other weights differ; the features must not
    here = _favor(_model()).projection.numpy()
    code = (
        f"import sys, numpy as np, keras; sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "import test_determinism as t; keras.utils.set_random_seed(7);"
        "np.save(sys.argv[1], t._favor(t._model()).projection.numpy())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.npy")], env=env, check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), here)
    assert not np.array_equal(_favor(_model(seed=6)).projection.numpy(), here)


def test_redraw_schedule_continues_identically_after_save_and_load(tmp_path):
    """Every `redraw_interval` training calls W is redrawn from the seed
    generator, whose state is saved with the model: a reloaded model redraws
    exactly the W the original would have."""
    model = _model()
    fm = _favor(model)
    first = fm.projection.numpy()
    for _ in range(3):  # calls 1-3: one redraw at call 2
        fm.redraw_if_due(training=True)
    assert not np.array_equal(fm.projection.numpy(), first)
    model.save(tmp_path / "m.keras")
    again = _favor(keras.saving.load_model(tmp_path / "m.keras"))
    fresh = _favor(_model())
    np.testing.assert_array_equal(again.projection.numpy(), fm.projection.numpy())
    for call in range(4, 9):
        for f in (fm, again, fresh):
            f.redraw_if_due(training=True)
        np.testing.assert_array_equal(again.projection.numpy(), fm.projection.numpy())
        if call % 2 == 0:  # a fresh model's generator is at another point
            assert not np.array_equal(fresh.projection.numpy(), fm.projection.numpy())
    before = fm.projection.numpy()
    fm.redraw_if_due(training=False)  # never at inference
    np.testing.assert_array_equal(fm.projection.numpy(), before)


def test_exported_model_uses_the_same_features(tmp_path):
    model = _model()
    x = np.random.default_rng(0).normal(size=(2, 6, 16)).astype("float32")
    export_saved_model(model, str(tmp_path / "sm"))
    errors = saved_model_errors(model, str(tmp_path / "sm"), x)
    assert errors["serve"] < 1e-5, errors
