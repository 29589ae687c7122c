"""Pixel-by-pixel image generation with a causal linear Transformer (the paper's
image experiment, scaled to a 2-core CPU).

Fashion-MNIST images (through TFDS) are downsampled to 14×14 and binarised;
each image is a sequence of 196 pixels after a start token. A causal linear
Transformer learns p(pixel | previous pixels); we report bits per dimension
on held-out images, sample a grid of images with the recurrent state (one
compiled step per pixel), save it as a PNG, and compare images per second
against the same model run without state (softmax or linear, recomputing the
whole prefix for every pixel, which is what softmax attention without a
cache must do).

    python examples/pixel_generation.py [--steps 800] [--png examples/pixel_samples.png]
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_linear_attention import RecurrentLM, build_causal_lm, generate  # noqa: E402
from keras_linear_attention.datasets import fashion_mnist  # noqa: E402

SIDE = 14
PIXELS = SIDE * SIDE
START = 2  # token before the first pixel; pixels are 0/1


def pixel_sequences(split: str, data_dir, batch_size: int, training: bool) -> tf.data.Dataset:
    def to_tokens(image, _label):
        small = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (SIDE, SIDE), "area")
        pixels = tf.reshape(tf.cast(small > 0.5, tf.int32), (PIXELS,))
        return tf.concat([[START], pixels[:-1]], 0), pixels

    ds = fashion_mnist.load(split, data_dir).map(to_tokens, tf.data.AUTOTUNE).cache()
    if training:
        ds = ds.shuffle(10_000, seed=0).repeat()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def sample_images(runner: RecurrentLM, count: int, seed: int) -> np.ndarray:
    prompts = np.full((count, 1), START, np.int32)
    tokens = generate(runner, prompts, PIXELS, temperature=1.0, seed=seed)
    return tokens[:, 1:].reshape(count, SIDE, SIDE)


def images_per_second_recurrent(runner: RecurrentLM, count: int) -> float:
    sample_images(runner, count, seed=1)  # compile prefill and step first
    start = time.perf_counter()
    sample_images(runner, count, seed=2)
    return count / (time.perf_counter() - start)


def save_grid(images: np.ndarray, path: str, columns: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns, rows))
    for ax, image in zip(axes.flat, images, strict=False):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
    fig.suptitle("Samples, 14×14 binarised Fashion-MNIST, causal linear Transformer")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def images_per_second_without_state(model, count: int) -> float:
    """Generate by re-running the full model on the growing prefix (greedy)."""
    run = tf.function(  # one trace for every prefix length
        lambda t: model(t, training=False)[:, -1],
        input_signature=[tf.TensorSpec((None, None), tf.int32)],
    )
    tokens = np.full((count, 1), START, np.int32)
    run(np.full((count, 3), START, np.int32))  # trace once
    start = time.perf_counter()
    for _ in range(PIXELS):
        nxt = np.argmax(run(tokens).numpy(), -1).astype(np.int32)
        tokens = np.concatenate([tokens, nxt[:, None]], 1)
    return count / (time.perf_counter() - start)


def train_and_sample(model, args, report: dict) -> None:
    """Fit, report held-out bits per dimension, save a grid of samples."""
    train = pixel_sequences("train", args.data_dir, args.batch_size, True)
    test = pixel_sequences(f"test[:{args.eval_images}]", args.data_dir, 250, False)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps, warmup_target=2e-3, warmup_steps=max(1, args.steps // 20)
    )
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(train, epochs=4, steps_per_epoch=max(1, args.steps // 4), verbose=args.verbose)
    report["test_bits_per_dim"] = model.evaluate(test, verbose=0) / math.log(2)
    save_grid(sample_images(RecurrentLM(model), args.samples, seed=0), args.png)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--png", default=os.path.join("examples", "pixel_samples.png"))
    p.add_argument("--verbose", type=int, default=1)
    p.add_argument("--speed-only", action="store_true", help="skip training; time generation")
    args = p.parse_args(argv)
    keras.utils.set_random_seed(0)
    start = time.time()
    make = lambda attention: build_causal_lm(
        3,
        sequence_length=PIXELS + 1,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=4,
        attention=attention,
        name=f"pixel_{attention}",
    )
    model = make("linear")
    report = {}
    if not args.speed_only:
        train_and_sample(model, args, report)
    runner = RecurrentLM(model)
    report["images_per_second_recurrent_linear"] = images_per_second_recurrent(runner, args.samples)
    report["images_per_second_stateless_linear"] = images_per_second_without_state(
        model, args.samples
    )
    report["images_per_second_stateless_softmax"] = images_per_second_without_state(
        make("softmax"), args.samples
    )
    report["seconds"] = time.time() - start
    for key, value in report.items():
        print(f"{key:<40} {value:.3f}")
    print(f"samples: {args.png}")
    return report


if __name__ == "__main__":
    main()
