"""Linearize a trained softmax character LM: same weights, attention transfer, short fine-tune.

The recipe of Hedgehog and LoLCATs (Zhang et al. 2024) on the King James
Bible (bytes, from the Debian package `bible-kjv`; every 20th verse held
out, as `datasets.kjv_bible` splits it):

1. train a softmax-attention causal LM (`build_causal_lm(attention="softmax")`);
2. `kla.linearize` it (Hedgehog feature maps, every other weight kept);
3. `kla.attention_transfer`: fit only the feature maps so each layer's
   linear attention reproduces its softmax attention;
4. fine-tune the whole model for at most 10% of the softmax training steps;

and beside it, the same linear model trained from scratch for as many steps
as stages 1, 3 and 4 together (and, with `--softmax-same-steps`, softmax
too). Prints held-out bits per character after each stage (lower is better)
and, with `--out`, writes them as JSON.

    python examples/linearize_char_lm.py               # the full run (tens of minutes)
    python examples/linearize_char_lm.py --quick       # smoke run, < 1 minute: numbers mean nothing
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
import numpy as np  # noqa: E402

import keras_linear_attention as kla  # noqa: E402
from keras_linear_attention.datasets import kjv_bible  # noqa: E402
from keras_linear_attention.export import export_bundle  # noqa: E402

QUICK = dict(
    steps=40, context=64, batch_size=8, hidden_dim=32, num_layers=1, transfer_steps=10,
    eval_windows=16,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="softmax training steps")
    p.add_argument("--finetune-fraction", type=float, default=0.1, help="of --steps (≤ 0.1)")
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--transfer-learning-rate", type=float, default=3e-2)
    p.add_argument(
        "--transfer-objective",
        default="outputs",
        choices=("outputs", "attention_weights"),
        help="attention_transfer's loss",
    )
    p.add_argument("--context", type=int, default=256, help="characters per training window")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--finetune-learning-rate", type=float, default=5e-4)
    p.add_argument("--feature-map", default=None, help="φ (default: linearize's, Hedgehog)")
    p.add_argument(
        "--recurrence",
        default="linear",
        choices=("linear", "retention", "gated", "delta", "gated_delta"),
        help="linearize's recurrence (not 'linear': no φ, its gates are the new weights)",
    )
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows (all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-jit", action="store_true", help="no XLA (slower on CPU)")
    p.add_argument(
        "--no-scratch", action="store_true", help="skip the from-scratch model (recipe search)"
    )
    p.add_argument(
        "--softmax-same-steps",
        action="store_true",
        help="also train softmax for the total steps (which a linearized model approximates)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: numbers mean nothing")
    p.add_argument(
        "--softmax-model", default=None, help=".keras file: reused if it exists, else written"
    )
    p.add_argument("--out", default=None, help="write the report to this JSON file")
    p.add_argument("--verbose", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if not 0 < args.finetune_fraction <= 0.1:
        p.error("--finetune-fraction must be in (0, 0.1]")
    return args


def kjv_bytes() -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out text as byte ids; held out: every 20th verse."""
    verses = kjv_bible.read_verses()
    split = lambda test: "".join(
        v + "\n" for i, v in enumerate(verses) if (i % kjv_bible.TEST_EVERY == 0) == test
    )
    as_ids = lambda text: np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    return as_ids(split(False)), as_ids(split(True))


def random_windows(data: np.ndarray, context: int, batch_size: int, seed: int):
    """Endless `(inputs, next bytes)` batches of windows at random offsets."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - context - 1, size=(batch_size, 1))
        chunk = data[starts + np.arange(context + 1)]
        yield chunk[:, :-1], chunk[:, 1:]


def held_out(data: np.ndarray, context: int, windows: int | None) -> tuple[np.ndarray, np.ndarray]:
    count = (len(data) - 1) // context
    count = min(count, windows) if windows else count
    x = data[: count * context].reshape(count, context)
    y = data[1 : count * context + 1].reshape(count, context)
    return x, y


def build(args, attention: str, feature_map=None) -> keras.Model:
    keras.utils.set_random_seed(args.seed)
    return kla.build_causal_lm(
        256,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        attention=attention,
        feature_map=feature_map or "elu",
        position="sinusoidal",
        name=f"kjv_{attention}",
    )


def compile_for(model: keras.Model, steps: int, peak: float, jit: bool) -> None:
    """AdamW with a linear warm-up and cosine decay over `steps`."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps), warmup_target=peak, warmup_steps=max(1, steps // 20)
    )
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=0.01, global_clipnorm=1.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )


def train(model, args, steps: int, peak: float, seed: int, data) -> float:
    """Compile and fit `steps` steps; returns the seconds it took."""
    start = time.perf_counter()
    compile_for(model, steps, peak, not args.no_jit)
    batches = random_windows(data, args.context, args.batch_size, seed)
    model.fit(batches, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=args.verbose)
    return time.perf_counter() - start


def bits_per_char(model, test: tuple) -> float:
    nats = model.evaluate(*test, batch_size=32, verbose=0)
    return nats / math.log(2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    train_ids, test_ids = kjv_bytes()
    test = held_out(test_ids, args.context, args.eval_windows)
    finetune_steps = max(1, int(args.steps * args.finetune_fraction))
    rows = []

    def record(stage, model, steps, seconds):
        rows.append(
            dict(stage=stage, steps=steps, seconds=seconds, bits=bits_per_char(model, test))
        )
        print(f"{stage:<44} {rows[-1]['bits']:.3f} bits/char", flush=True)

    softmax, seconds = softmax_lm(args, train_ids)
    record("softmax", softmax, args.steps, seconds)

    keras.utils.set_random_seed(args.seed)  # the new weights' initial values
    linear = kla.linearize(softmax, feature_map=args.feature_map, recurrence=args.recurrence)
    compile_for(linear, finetune_steps, args.finetune_learning_rate, not args.no_jit)
    record("linearized, no training", linear, 0, 0.0)

    t0 = time.perf_counter()
    x_only = (x for x, _ in random_windows(train_ids, args.context, args.batch_size, 2))
    kla.attention_transfer(
        softmax, linear, x_only, steps=args.transfer_steps,
        learning_rate=args.transfer_learning_rate, objective=args.transfer_objective,
        jit_compile=not args.no_jit,
        verbose=args.verbose,
    )  # fmt: skip
    record("+ attention transfer", linear, args.transfer_steps, time.perf_counter() - t0)

    seconds = train(linear, args, finetune_steps, args.finetune_learning_rate, 3, train_ids)
    record(f"+ fine-tune ({finetune_steps} steps)", linear, finetune_steps, seconds)

    total = args.steps + args.transfer_steps + finetune_steps
    if not args.no_scratch:
        # The linearized model's φ (its config) or recurrence, trained from scratch.
        if args.recurrence == "linear":
            scratch = build(args, "linear", linear.get_layer("decoder_0").feature_map)
        else:
            scratch = build(args, args.recurrence)
        seconds = train(scratch, args, total, args.learning_rate, 1, train_ids)
        record(f"linear from scratch, {total} steps", scratch, total, seconds)
    if args.softmax_same_steps:
        # A linearized model approximates its softmax model: this one, trained
        # for as many steps, is what it would score as a perfect copy.
        longer = build(args, "softmax")
        seconds = train(longer, args, total, args.learning_rate, 1, train_ids)
        record(f"softmax, {total} steps", longer, total, seconds)

    report = summary(args, rows, time.perf_counter() - start)
    report["deploy"] = deploy(linear, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def softmax_lm(args, train_ids: np.ndarray) -> tuple[keras.Model, float]:
    """The trained softmax LM and its training seconds: loaded from
    `--softmax-model` when that file exists (trained with these arguments),
    else trained here and, with `--softmax-model`, saved there."""
    path = args.softmax_model
    if path and os.path.exists(path):
        return keras.models.load_model(path), 0.0
    model = build(args, "softmax")
    seconds = train(model, args, args.steps, args.learning_rate, 1, train_ids)
    if path:
        model.save(path)
    return model, seconds


def deploy(model: keras.Model, args) -> dict:
    """Export the linearized LM (SavedModel with `prefill`/`step`, TFLite
    `step`, each checked against Keras) and time recurrent generation per
    token after a short and a long prompt: the state has a fixed size, so
    the cost per token should not grow with the context."""
    out = tempfile.mkdtemp(prefix="linearized_lm_")
    bundle = export_bundle(model, out, ("float32",))
    contexts = (64, 256) if args.quick else (256, 4096)
    ms = {n: ms_per_token(model, n, 8 if args.quick else 64) for n in contexts}
    result = {
        "signatures": bundle["saved_model"]["signatures"],
        "saved_model_max_abs_error": bundle["saved_model"]["max_abs_error"],
        "tflite_step_max_abs_error": bundle["tflite"]["step.float32"]["max_abs_error"],
        "ms_per_token": ms,
    }
    print(
        f"export: {result['signatures']}, TFLite step error {result['tflite_step_max_abs_error']}"
    )
    print("generation, ms per token after " + ", ".join(f"{n}: {v:.2f}" for n, v in ms.items()))
    return result


def ms_per_token(model: keras.Model, context: int, steps: int) -> float:
    """Median ms of one recurrent step (`RecurrentLM.step`, XLA) after a
    `context`-byte prompt read in parallel (`prefill`)."""
    runner = kla.RecurrentLM(model)
    prompt = np.random.default_rng(0).integers(32, 127, (1, context))
    logits, states = runner.prefill(prompt)
    token = np.argmax(np.asarray(logits), -1)
    runner.step(token, states, context)  # compiles
    times = []
    for index in range(context, context + steps):
        start = time.perf_counter()
        logits, states = runner.step(token, states, index)
        token = np.argmax(np.asarray(logits), -1)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def summary(args, rows: list, seconds: float) -> dict:
    scratch_rows = [row for row in rows if row["stage"].startswith("linear from scratch")]
    softmax = rows[0]["bits"]
    linearized = [row for row in rows if row["stage"].startswith("+ fine-tune")][0]["bits"]
    print("\n| stage | steps | seconds | held-out bits/char | × softmax |\n|---|---|---|---|---|")
    for row in rows:
        ratio = row["bits"] / softmax
        cells = f"{row['stage']} | {row['steps']} | {row['seconds']:.0f} | {row['bits']:.3f}"
        print(f"| {cells} | {ratio:.3f} |")
    targets = {
        "linearized ≤ 1.05× softmax": linearized <= 1.05 * softmax,
        # None: not measured (--no-scratch).
        "linearized better than from scratch": (
            linearized < scratch_rows[0]["bits"] if scratch_rows else None
        ),
    }
    for name, met in targets.items():
        print(
            f"{name}: {'not measured' if met is None else 'met' if met else 'NOT met'}"
            + (" (--quick: meaningless)" if args.quick else "")
        )
    print(f"total seconds: {seconds:.0f}")
    return {"config": vars(args), "stages": rows, "targets": targets, "seconds": seconds}


if __name__ == "__main__":
    main()
