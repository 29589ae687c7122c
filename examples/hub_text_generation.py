"""A keras-hub `CausalLM` with linear attention: train on the KJV text, sample, export.

GPT-2's architecture (`kla.hub.LinearGPT2Backbone`, built from a config: no
preset download) over bytes (`ByteLevelTokenizer`, through keras-hub's
`CausalLMPreprocessor`), trained with `fit` on the King James Bible (TFDS,
from the Debian package `bible-kjv`; every 20th verse held out). Then
`generate("...")` with keras-hub's top-p sampler, which runs the model as an
RNN (constant cost per byte), and an export: a SavedModel with `serve`,
`prefill` and `step` signatures and a TFLite `step`, each checked against
Keras.

    python examples/hub_text_generation.py             # about 7 minutes on 2 CPU cores
    python examples/hub_text_generation.py --steps 3 --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from keras_linear_attention import hub  # noqa: E402
from keras_linear_attention.datasets import kjv_bible  # noqa: E402
from keras_linear_attention.export import convert_to_tflite, parity  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2400, help="training steps")
    p.add_argument("--sequence-length", type=int, default=128, help="bytes per training window")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=4e-3)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--prompt", default="In the beginning")
    p.add_argument("--max-length", type=int, default=200, help="of the generated text, bytes")
    p.add_argument("--eval-batches", type=int, default=None, help="limit the held-out batches")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="tiny model and data: numbers mean nothing")
    p.add_argument("--verbose", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.sequence_length, args.hidden_dim, args.num_layers = 32, 16, 1
        args.batch_size, args.eval_batches, args.max_length = 4, 2, 40
    return args


def text_windows(split: str, length: int, data_dir: str | None) -> list[str]:
    """The split's verses joined into one text, cut into `length`-byte windows."""
    verses = tfds.as_numpy(kjv_bible.load(split, data_dir))
    text = " ".join(v.decode("utf-8") for v in verses)
    return [text[i : i + length] for i in range(0, len(text) - length, length)]


def build_lm(args) -> keras.Model:
    backbone = hub.LinearGPT2Backbone(
        vocabulary_size=256,
        num_layers=args.num_layers,
        num_heads=4 if args.hidden_dim % 4 == 0 else 2,
        hidden_dim=args.hidden_dim,
        intermediate_dim=4 * args.hidden_dim,
        max_sequence_length=max(args.sequence_length, args.max_length),
        dropout=0.0,
    )
    preprocessor = hub.LinearGPT2CausalLMPreprocessor(
        hub.ByteLevelTokenizer(), sequence_length=args.sequence_length
    )
    lm = hub.LinearGPT2CausalLM(backbone, preprocessor)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(args.steps, 1), warmup_target=args.learning_rate, warmup_steps=args.steps // 20
    )
    lm.compile(
        optimizer=keras.optimizers.AdamW(schedule),
        sampler=keras_hub.samplers.TopPSampler(p=args.top_p, seed=0),
    )
    return lm


def check_export(lm: keras.Model, path: str, prompt: str) -> dict:
    """Max |exported - Keras| of the next-byte logits after `prompt`: the
    SavedModel's `serve` and `prefill`+`step`, and the TFLite `step`."""
    signatures = hub.export_causal_lm(lm, path)
    ids = np.asarray([list(prompt.encode("utf-8"))], np.int32)
    expected = np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))
    loaded = tf.saved_model.load(path).signatures
    serve = loaded["serve"](token_ids=ids, padding_mask=np.ones_like(ids, bool))["logits"]
    states = loaded["prefill"](token_ids=ids[:, :-1])
    states = {k: v.numpy() for k, v in states.items() if k != "logits"}
    index = np.asarray(ids.shape[1] - 1, np.int32)
    step = loaded["step"](token=ids[:, -1], index=index, **states)["logits"]
    flatbuffer = convert_to_tflite(path, "step")
    runner = parity.tflite_runner(flatbuffer).get_signature_runner("step")
    lite = runner(token=ids[:, -1], index=index, **states)["logits"]
    err = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)))
    return {
        "signatures": signatures,
        "tflite_step_bytes": len(flatbuffer),
        "max_abs_error": {
            "serve": err(serve, expected),
            "prefill+step": err(step, expected[:, -1]),
            "tflite step": err(lite, expected[:, -1]),
        },
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    keras.utils.set_random_seed(0)
    train = text_windows("train", args.sequence_length, args.data_dir)
    test = text_windows("test", args.sequence_length, args.data_dir)
    if args.quick:
        train, test = train[:64], test[:8]
    train_ds = tf.data.Dataset.from_tensor_slices(train).shuffle(len(train), seed=0)
    train_ds = train_ds.repeat().batch(args.batch_size, drop_remainder=True)
    test_ds = tf.data.Dataset.from_tensor_slices(test).batch(args.batch_size)
    if args.eval_batches:
        test_ds = test_ds.take(args.eval_batches)
    lm = build_lm(args)
    start = time.time()
    lm.fit(train_ds, steps_per_epoch=args.steps, epochs=1, verbose=args.verbose)
    train_seconds = time.time() - start
    loss = lm.evaluate(test_ds, verbose=0, return_dict=True)["loss"]
    start = time.time()
    text = lm.generate(args.prompt, max_length=args.max_length)
    generate_seconds = time.time() - start
    path = args.out or tempfile.mkdtemp(prefix="hub_lm_")
    report = {
        "steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "held_out_bits_per_byte": loss / math.log(2),
        "sampler": f"top-p, p={args.top_p}",
        "prompt": args.prompt,
        "generated": text,
        "generate_seconds": round(generate_seconds, 2),
        "export": {"path": path, **check_export(lm, path, args.prompt)},
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
