"""A character-level causal language model on the King James Bible, through TFDS.

Trains a causal linear Transformer on bytes of the public-domain KJV text
(prepared into a TFDS `data_dir` from the Debian package `bible-kjv`),
reports bits per character on the held-out split (every 20th verse), and
prints a sample generated with the recurrent state (constant cost per byte).

    python examples/char_lm.py [--steps 600] [--prompt "And God said"]
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_linear_attention import build_causal_lm, generate  # noqa: E402
from keras_linear_attention.datasets import kjv_bible, pipelines  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--sequence-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=None, help="limit the held-out batches")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--prompt", default="And God said")
    p.add_argument("--sample-length", type=int, default=300)
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keras.utils.set_random_seed(0)
    start = time.time()
    train = pipelines.char_language_model(
        kjv_bible.load("train", args.data_dir), args.sequence_length, args.batch_size, True
    ).repeat()
    test = pipelines.char_language_model(
        kjv_bible.load("test", args.data_dir), args.sequence_length, args.batch_size, False
    )
    if args.eval_batches:
        test = test.take(args.eval_batches)
    model = build_causal_lm(
        256,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=4,
        position="sinusoidal",
        name="kjv_char_lm",
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps, warmup_target=args.learning_rate, warmup_steps=max(1, args.steps // 20)
    )
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    epochs = 4
    model.fit(
        train, epochs=epochs, steps_per_epoch=max(1, args.steps // epochs), verbose=args.verbose
    )
    nats = model.evaluate(test, verbose=0)
    prompt = np.frombuffer(args.prompt.encode(), np.uint8).astype(np.int32)[None]
    sample = generate(model, prompt, args.sample_length, temperature=0.8, top_k=20, seed=0)
    text = bytes(sample[0].astype(np.uint8)).decode("utf-8", errors="replace")
    report = {"test_bits_per_char": nats / math.log(2), "seconds": time.time() - start}
    print(f"held-out bits per character: {report['test_bits_per_char']:.3f}")
    print(f"sample: {text}")
    print(f"total seconds: {report['seconds']:.0f}")
    return report


if __name__ == "__main__":
    main()
