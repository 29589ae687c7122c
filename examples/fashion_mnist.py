"""The main job: a linear-attention Transformer on Fashion-MNIST, end to end.

Loads Fashion-MNIST with `tfds.load` (prepared offline from the Debian package
`dataset-fashion-mnist` when present, downloaded otherwise), turns each image
into a sequence of 7×7 patches, trains with `model.fit`, evaluates on the test
split, saves the `.keras` model, exports SavedModel + TFLite (float32, float16,
int8) into `saved_models/fashion_mnist/`, checks every export against Keras, and
prints a report. `--compare-softmax` also trains the same model with softmax
attention, for an honest look at the quality trade-off.

    python examples/fashion_mnist.py [--epochs 10] [--compare-softmax]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_linear_attention.datasets import fashion_mnist, pipelines  # noqa: E402
from keras_linear_attention.export import export_bundle, format_summary, parity  # noqa: E402
from keras_linear_attention.models import build_sequence_classifier  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--data-dir", default=None, help="TFDS data_dir (default ~/tensorflow_datasets)")
    p.add_argument("--out", default=os.path.join("saved_models", "fashion_mnist"))
    p.add_argument("--train-examples", type=int, default=None, help="use a slice (smoke runs)")
    p.add_argument("--compare-softmax", action="store_true")
    p.add_argument("--jit-compile", action="store_true", help="XLA-compile the train step")
    p.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity (1 = progress bar)")
    return p.parse_args(argv)


def datasets(args):
    train_split = "train" if args.train_examples is None else f"train[:{args.train_examples}]"
    test_split = "test" if args.train_examples is None else f"test[:{args.train_examples}]"
    train = fashion_mnist.load(train_split, args.data_dir)
    test = fashion_mnist.load(test_split, args.data_dir)
    return (
        pipelines.patch_classification(train, args.patch_size, args.batch_size, training=True),
        pipelines.patch_classification(test, args.patch_size, 500, training=False),
    )


def train(args, train_ds, test_ds, attention: str):
    keras.utils.set_random_seed(0)
    model = build_sequence_classifier(
        10,
        feature_dim=args.patch_size**2,
        sequence_length=(28 // args.patch_size) ** 2,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=4,
        dropout=args.dropout,
        attention=attention,
        name=f"fashion_mnist_{attention}",
    )
    steps = args.epochs * len(train_ds)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, warmup_target=args.learning_rate, warmup_steps=max(1, steps // 20)
    )
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=args.jit_compile,
    )
    start = time.time()
    model.fit(train_ds, epochs=args.epochs, verbose=args.verbose)
    seconds = time.time() - start
    _, accuracy = model.evaluate(test_ds, verbose=0)
    return model, accuracy, seconds


def tflite_accuracy(path: str, test_ds) -> float:
    """Accuracy of an exported `serve` TFLite file on the test split."""
    runner = parity.tflite_runner(open(path, "rb").read()).get_signature_runner("serve")
    correct = total = 0
    for x, y in test_ds.as_numpy_iterator():
        logits = runner(features=x)["logits"]
        correct += int(np.sum(np.argmax(logits, -1) == y))
        total += len(y)
    return correct / total


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    train_ds, test_ds = datasets(args)
    model, accuracy, seconds = train(args, train_ds, test_ds, "linear")
    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "model.keras")
    model.save(model_path)
    sample = next(test_ds.as_numpy_iterator())[0][:8]
    summary = export_bundle(model, args.out, sample=sample)
    report = {"linear_accuracy": accuracy, "linear_train_seconds": seconds}
    for q in ("float32", "int8"):
        report[f"tflite_{q}_accuracy"] = tflite_accuracy(
            summary["tflite"][f"serve.{q}"]["path"], test_ds
        )
    if args.compare_softmax:
        _, report["softmax_accuracy"], report["softmax_train_seconds"] = train(
            args, train_ds, test_ds, "softmax"
        )
    report["total_seconds"] = time.time() - start
    print(format_summary(summary))
    print(f"Keras model: {model_path}")
    for key, value in report.items():
        print(f"{key:<28} {value:.4f}")
    return report


if __name__ == "__main__":
    main()
