"""`ClassifierHyperModel`: a keras-tuner search space over linear-attention classifiers."""

from __future__ import annotations

import keras
import keras_tuner as kt

from keras_linear_attention.models.sequence_classifier import build_sequence_classifier


class ClassifierHyperModel(kt.HyperModel):
    """Searches the feature map (`elu`, `relu`, `favor`), heads, depth, width
    and learning rate of `build_sequence_classifier`, compiled for integer labels.

    The model's structure depends only on the hyperparameters, so the tuner
    can rebuild any trial and load its saved weights (`get_best_models`).

    Args:
        num_classes: Number of classes.
        feature_dim: Size of the float input vectors.
        sequence_length: Sequence length (learned position table).
        jit_compile: Passed to `compile`.

    Example:

    >>> import tempfile
    >>> hypermodel = ClassifierHyperModel(10, feature_dim=49, sequence_length=16)
    >>> hypermodel.build(kt.HyperParameters()).output_shape  # the first choices
    (None, 10)
    >>> tuner = kt.RandomSearch(
    ...     hypermodel, objective="val_accuracy", max_trials=4, directory=tempfile.mkdtemp()
    ... )
    >>> sorted(tuner.oracle.hyperparameters.values)
    ['feature_map', 'hidden_dim', 'learning_rate', 'num_heads', 'num_layers']
    """

    def __init__(self, num_classes: int, feature_dim: int, sequence_length: int, jit_compile=False):
        super().__init__(name="linear_attention_classifier")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.sequence_length = sequence_length
        self.jit_compile = jit_compile

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        model = build_sequence_classifier(
            self.num_classes,
            feature_dim=self.feature_dim,
            sequence_length=self.sequence_length,
            feature_map=hp.Choice("feature_map", ["elu", "relu", "favor"]),
            num_heads=hp.Choice("num_heads", [2, 4, 8]),
            num_layers=hp.Int("num_layers", 1, 3),
            hidden_dim=hp.Choice("hidden_dim", [64, 128]),
            dropout=0.0,
        )
        model.compile(
            keras.optimizers.Adam(hp.Float("learning_rate", 5e-4, 5e-3, sampling="log")),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=self.jit_compile,
        )
        return model
