"""keras-tuner random search over linear-attention classifiers on Fashion-MNIST.

Searches the feature map (elu/relu/favor), heads, depth, width and learning
rate on a training slice, validates on held-out training images, prints the
best trial, then reloads the best model from the tuner and scores it on the
test split.

    python examples/tune_fashion_mnist.py [--trials 4] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras_tuner as kt  # noqa: E402

from keras_linear_attention.datasets import fashion_mnist, pipelines  # noqa: E402
from keras_linear_attention.tuning import ClassifierHyperModel  # noqa: E402

PATCH = 7


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-examples", type=int, default=20000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--directory", default=None, help="tuner folder (default: a temporary one)")
    args = p.parse_args(argv)
    data = {
        name: pipelines.patch_classification(
            fashion_mnist.load(split, args.data_dir), PATCH, 128, training=name == "train"
        )
        for name, split in [
            ("train", f"train[:{args.train_examples}]"),
            ("validation", "train[50000:]"),
            ("test", "test"),
        ]
    }
    tuner = kt.RandomSearch(
        ClassifierHyperModel(10, feature_dim=PATCH * PATCH, sequence_length=(28 // PATCH) ** 2),
        objective="val_accuracy",
        max_trials=args.trials,
        seed=0,
        directory=args.directory or tempfile.mkdtemp(prefix="kla_tuner_"),
        project_name="fashion_mnist",
    )
    tuner.search(data["train"], validation_data=data["validation"], epochs=args.epochs, verbose=2)
    best = tuner.oracle.get_best_trials(1)[0]
    model = tuner.get_best_models(1)[0]
    _, test_accuracy = model.evaluate(data["test"], verbose=0)
    print(f"best trial {best.trial_id}: val_accuracy {best.score:.4f}")
    print("  hyperparameters:", best.hyperparameters.values)
    print(f"  reloaded best model, test accuracy {test_accuracy:.4f}")
    return {"best": best.hyperparameters.values, "val_accuracy": best.score, "test": test_accuracy}


if __name__ == "__main__":
    main()
