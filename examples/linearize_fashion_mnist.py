"""Linearize a trained softmax Fashion-MNIST classifier: same weights, transfer, short fine-tune.

The companion of `linearize_char_lm.py` for a non-causal encoder: a softmax
Transformer classifier over 7×7 patches (`build_sequence_classifier(
attention="softmax")`), then `kla.linearize`, `kla.attention_transfer` and a
fine-tune of at most 10% of the softmax training steps, beside the same
linear classifier trained from scratch for as many steps in all. Prints test
accuracy after each stage and, with `--out`, writes it as JSON. Data: the
Debian package `dataset-fashion-mnist` through TFDS, offline.

    python examples/linearize_fashion_mnist.py            # the full run
    python examples/linearize_fashion_mnist.py --quick    # smoke run: numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_linear_attention as kla  # noqa: E402
from keras_linear_attention.datasets import fashion_mnist, pipelines  # noqa: E402

QUICK = dict(epochs=1, train_examples=2000, hidden_dim=32, num_layers=1, transfer_steps=10)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="softmax training epochs")
    p.add_argument("--finetune-fraction", type=float, default=0.1, help="of the softmax steps")
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--transfer-learning-rate", type=float, default=3e-2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--finetune-learning-rate", type=float, default=5e-4)
    p.add_argument("--feature-map", default=None, help="φ (default: linearize's, Hedgehog)")
    p.add_argument("--train-examples", type=int, default=None, help="use a slice (smoke runs)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--no-jit", action="store_true", help="no XLA (slower on CPU)")
    p.add_argument("--quick", action="store_true", help="smoke run: numbers mean nothing")
    p.add_argument("--out", default=None, help="write the report to this JSON file")
    p.add_argument("--verbose", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if not 0 < args.finetune_fraction <= 0.1:
        p.error("--finetune-fraction must be in (0, 0.1]")
    return args


def datasets(args):
    n = args.train_examples
    train = fashion_mnist.load("train" if n is None else f"train[:{n}]", args.data_dir)
    test = fashion_mnist.load("test" if n is None else f"test[:{min(n, 10_000)}]", args.data_dir)
    return (
        pipelines.patch_classification(train, 7, args.batch_size, training=True),
        pipelines.patch_classification(test, 7, 500, training=False),
    )


def build(args, attention: str, feature_map=None) -> keras.Model:
    keras.utils.set_random_seed(0)
    return kla.build_sequence_classifier(
        10,
        feature_dim=49,
        sequence_length=16,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=4,
        dropout=0.0,
        attention=attention,
        feature_map=feature_map or "elu",
        name=f"fashion_mnist_{attention}",
    )


def compile_for(model, steps: int, peak: float, jit: bool) -> None:
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps), warmup_target=peak, warmup_steps=max(1, steps // 20)
    )
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit,
    )


def train(model, args, train_ds, steps: int, peak: float) -> float:
    start = time.perf_counter()
    compile_for(model, steps, peak, not args.no_jit)
    model.fit(
        train_ds.repeat(), epochs=1, steps_per_epoch=steps, shuffle=False, verbose=args.verbose
    )
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    train_ds, test_ds = datasets(args)
    steps = args.epochs * len(train_ds)
    finetune_steps = max(1, int(steps * args.finetune_fraction))
    rows = []

    def record(stage, model, stage_steps, seconds):
        accuracy = float(model.evaluate(test_ds, verbose=0)[1])
        rows.append(dict(stage=stage, steps=stage_steps, seconds=seconds, accuracy=accuracy))
        print(f"{stage:<44} {accuracy:.4f} test accuracy", flush=True)

    softmax = build(args, "softmax")
    record("softmax", softmax, steps, train(softmax, args, train_ds, steps, args.learning_rate))

    linear = kla.linearize(softmax, feature_map=args.feature_map)
    compile_for(linear, finetune_steps, args.finetune_learning_rate, not args.no_jit)
    record("linearized, no training", linear, 0, 0.0)

    t0 = time.perf_counter()
    kla.attention_transfer(
        softmax, linear, train_ds.repeat(), steps=args.transfer_steps,
        learning_rate=args.transfer_learning_rate, jit_compile=not args.no_jit,
        verbose=args.verbose,
    )  # fmt: skip
    record("+ attention transfer", linear, args.transfer_steps, time.perf_counter() - t0)

    seconds = train(linear, args, train_ds, finetune_steps, args.finetune_learning_rate)
    record(f"+ fine-tune ({finetune_steps} steps)", linear, finetune_steps, seconds)

    total = steps + args.transfer_steps + finetune_steps
    scratch = build(args, "linear", _scratch_feature_map(linear))
    seconds = train(scratch, args, train_ds, total, args.learning_rate)
    record(f"linear from scratch, {total} steps", scratch, total, seconds)
    return summary(args, rows, time.perf_counter() - start)


def _scratch_feature_map(linear):
    """The linearized model's φ config, for a from-scratch twin of it."""
    return linear.get_layer("encoder_0").feature_map


def summary(args, rows, seconds) -> dict:
    softmax, linearized, scratch = (rows[i]["accuracy"] for i in (0, -2, -1))
    print("\n| stage | steps | seconds | test accuracy | / softmax |\n|---|---|---|---|---|")
    for row in rows:
        ratio = row["accuracy"] / softmax
        cells = f"{row['stage']} | {row['steps']} | {row['seconds']:.0f} | {row['accuracy']:.4f}"
        print(f"| {cells} | {ratio:.3f} |")
    targets = {
        "linearized ≥ 0.99× softmax": linearized >= 0.99 * softmax,
        "linearized ≥ from scratch": linearized >= scratch,
    }
    note = " (--quick: meaningless)" if args.quick else ""
    for name, met in targets.items():
        print(f"{name}: {'met' if met else 'NOT met'}{note}")
    print(f"total seconds: {seconds:.0f}")
    report = {"config": vars(args), "stages": rows, "targets": targets, "seconds": seconds}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
