"""Quality of every attention kind against softmax, on one budget (issue 17).

    python benchmarks/quality.py [--quick] [--full] [--tasks mqar,lm,pixels]
                                 [--kinds softmax,linear-elu,...] [--out DIR]

Three tasks, each kind trained from the same initial weights (fixed seeds) on
the same data for the same number of steps:

1. MQAR, multi-query associative recall (Zoology's generator, `mqar.py`):
   cells (T, KV) = (64, 4), (128, 8) (and (256, 16) with `--full`) at
   d_model 64 and 128, 2 layers; a few learning rates per cell, the best one
   reported, as Zoology does. Accuracy over the query positions of a held-out
   set. The LM head runs at the KV query positions only (the loss is defined
   there alone), which cuts its cost by T/KV.
2. Character LM on the King James Bible (TFDS builder over the Debian package
   `bible-kjv`): held-out bits per character.
3. Pixels: Fashion-MNIST images (downsampled, 256 grey levels) generated pixel by
   pixel, held-out bits per dimension (the paper's MNIST: softmax 0.621, linear
   0.644 at 28×28), softmax against linear (elu+1).

Beside each score: training seconds (compilation excluded) and the recurrent
state in bytes per sequence (float32; softmax's K/V cache at the task's length,
which grows with the length). A comparison counts only where softmax learned
the task (MQAR: softmax ≥ 0.95); the table says so per cell, and the issue's
targets are rows of the table: "met", "not met" or "not comparable".

Writes `quality.json`, `quality.md` and `mqar.png` (accuracy against d_model
per kind) under `--out` (default `benchmarks/results`). `--quick` is a smoke
run (tiny models, few steps, two kinds per task, no targets): its numbers mean
nothing. `--estimate` prints the time estimate and exits.

Default budget (every size is a flag): MQAR 2000 steps × batch 64 (128k
examples; Zoology trains on 100k), learning rates 3e-3 then 1e-3 (`--full`: also
1e-2, and the cell (256, 16)), each run stopping once its validation accuracy
reaches 0.99; char LM 2 layers of width 128, context 256, 800 steps × 16;
pixels 28×28, 2 layers of width 128, 800 steps × 8. Softmax needs about
750-1750 of those MQAR steps (its accuracy jumps from chance to ≥ 0.99 within
~500 steps), so a smaller budget leaves every cell "not comparable". MQAR is
most of the time: about 2-3 h in all on a quiet 2-core machine.

The package measured is the one Python imports: run from the repository root
with `PYTHONPATH=.` to measure the checkout rather than an installed copy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqar as mqar_data  # noqa: E402

KINDS = [
    "softmax",
    "linear-elu",
    "linear-favor",
    "linear-taylor",
    "linear-hedgehog",
    "retention",
    "gated",
    "delta",
    "gated_delta",
]
LINEAR_TIME = [k for k in KINDS if k != "softmax"]
PIXEL_KINDS = ["softmax", "linear-elu", "gated", "gated_delta"]
QUICK_KINDS = ["softmax", "linear-elu"]
TASKS = ["mqar", "lm", "pixels"]
FULL_LRS = [3e-3, 1e-3, 1e-2]
SOFTMAX_LEARNED = 0.95  # MQAR: below this, the budget is too small to compare
TARGET_GAP_POINTS = 0.03
LM_TARGET_RATIO = 1.02
PIXEL_TARGET_RATIO = 1.04

# Seconds per XLA-compiled training step (float32) at one shape per model
# family, measured on a 2-core AMD EPYC shared with other jobs (load 1-1.7;
# repeated measurements spread by up to 2×). `estimate_step_seconds` scales
# them to other shapes.
STEP_SECONDS = {
    # MQAR: attention-only blocks (Zoology's), batch 64 × T 64, 2 layers, width
    # 64: the median over the four default cells of the time scaled back here.
    "mixer": (
        {"tokens": 4096, "length": 64, "layers": 2, "width": 64},
        {
            "softmax": 0.019,
            "linear-elu": 0.023,
            "linear-favor": 0.027,
            "linear-taylor": 0.075,
            "linear-hedgehog": 0.037,
            "retention": 0.041,
            "gated": 0.056,
            "delta": 0.049,
            "gated_delta": 0.056,
        },
    ),
    # Char LM and pixels: decoder blocks with feed-forward, batch 16 × T 256,
    # 2 layers, width 128.
    "block": (
        {"tokens": 4096, "length": 256, "layers": 2, "width": 128},
        {
            "softmax": 0.151,
            "linear-elu": 0.117,
            "linear-favor": 0.133,
            "linear-taylor": 0.348,
            "linear-hedgehog": 0.172,
            "retention": 0.140,
            "gated": 0.146,
            "delta": 0.163,
            "gated_delta": 0.176,
        },
    ),
}


# ----------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    tasks: list
    kinds: list
    quick: bool = False
    full: bool = False
    merge: bool = False  # keep the tasks of an earlier quality.json
    from_partial: bool = False  # MQAR from mqar_partial.json, no training
    seed: int = 0
    jit: bool | None = None
    head_dim: int = 32
    taylor_head_dim: int = 16
    taylor_compact: bool = False
    conv_size: int = 4
    # MQAR
    mqar_cells: list = field(default_factory=lambda: [(64, 4), (128, 8)])
    mqar_dims: list = field(default_factory=lambda: [64, 128])
    mqar_layers: int = 2
    mqar_vocab: int = 256
    mqar_steps: int = 2000
    mqar_batch: int = 64
    mqar_train_examples: int = 100_000
    mqar_test_examples: int = 2000
    mqar_lrs: list = field(default_factory=lambda: [3e-3, 1e-3])
    mqar_stop_at: float = 0.99
    mqar_eval_every: int = 250
    # Character LM
    lm_steps: int = 800
    lm_batch: int = 16
    lm_context: int = 256
    lm_width: int = 128
    lm_layers: int = 2
    lm_lr: float = 2e-3
    lm_eval_windows: int = 128
    # Pixels
    pixel_side: int = 28
    pixel_steps: int = 800
    pixel_batch: int = 8
    pixel_width: int = 128
    pixel_layers: int = 2
    pixel_lr: float = 2e-3
    pixel_eval_images: int = 1000
    pixel_train_images: int | None = None  # None: all 60k
    data_dir: str | None = None


def quick_config(config: Config) -> Config:
    config.kinds = [k for k in config.kinds if k in QUICK_KINDS] or QUICK_KINDS
    config.mqar_cells, config.mqar_dims = [(32, 4)], [32]
    config.mqar_vocab, config.mqar_steps, config.mqar_batch = 64, 20, 16
    config.mqar_train_examples, config.mqar_test_examples = 320, 64
    config.mqar_lrs, config.mqar_eval_every = [3e-3], 10
    config.lm_steps, config.lm_batch, config.lm_context = 10, 4, 64
    config.lm_width, config.lm_layers, config.lm_eval_windows = 32, 1, 4
    config.pixel_side, config.pixel_steps, config.pixel_batch = 7, 10, 8
    config.pixel_width, config.pixel_layers, config.pixel_eval_images = 32, 1, 32
    config.pixel_train_images = 1000
    return config


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Config(tasks=TASKS, kinds=KINDS)
    csv = lambda s: [x for x in s.split(",") if x]
    floats = lambda s: [float(x) for x in csv(s)]
    ints = lambda s: [int(x) for x in csv(s)]
    p.add_argument("--tasks", type=csv, default=TASKS, help="comma-separated: mqar,lm,pixels")
    p.add_argument("--kinds", type=csv, default=KINDS, help=f"comma-separated of {KINDS}")
    p.add_argument("--quick", action="store_true", help="smoke run: numbers mean nothing")
    p.add_argument(
        "--full",
        action="store_true",
        help=f"add the MQAR cell (256, 16); learning rates {FULL_LRS}",
    )
    p.add_argument("--estimate", action="store_true", help="print the time estimate and exit")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument(
        "--merge",
        action="store_true",
        help="add what the quality.json under --out holds and this run does not: its "
        "other tasks; where the settings match, its other char-LM and pixel kinds, its "
        "other MQAR cells, and each MQAR kind's best run over both learning-rate sweeps",
    )
    p.add_argument(
        "--from-partial",
        action="store_true",
        help="MQAR from the finished cells of a stopped run (--out's mqar_partial.json; "
        "pass that run's flags), without training",
    )
    p.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="XLA-compile the train steps (default: on, off with --quick)",
    )
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--taylor-head-dim", type=int, default=d.taylor_head_dim)
    p.add_argument(
        "--taylor-compact",
        action=argparse.BooleanOptionalAction,
        default=d.taylor_compact,
        help="taylor keeps each product x_a·x_b once (same kernel, 1 + D + D(D+1)/2 features)",
    )
    p.add_argument(
        "--conv-size", type=int, default=d.conv_size, help="recurrences' short conv; 0: none"
    )
    p.add_argument("--mqar-dims", type=ints, default=d.mqar_dims)
    p.add_argument("--mqar-vocab", type=int, default=d.mqar_vocab)
    p.add_argument("--mqar-steps", type=int, default=d.mqar_steps)
    p.add_argument("--mqar-batch", type=int, default=d.mqar_batch)
    p.add_argument("--mqar-train-examples", type=int, default=d.mqar_train_examples)
    p.add_argument("--mqar-test-examples", type=int, default=d.mqar_test_examples)
    p.add_argument(
        "--mqar-lrs",
        type=floats,
        default=None,
        help=f"tried in this order (default {d.mqar_lrs}; with --full {FULL_LRS})",
    )
    p.add_argument(
        "--mqar-cells",
        type=lambda s: [tuple(int(v) for v in c.split("x")) for c in csv(s)],
        default=None,
        help="T×KV list, e.g. 64x4,128x8 (default: those two, plus 256x16 with --full)",
    )
    p.add_argument(
        "--mqar-stop-at",
        type=float,
        default=d.mqar_stop_at,
        help="a run stops once its validation accuracy (a third generated set) reaches "
        "this, and the kind's remaining learning rates in that cell are skipped (> 1: never)",
    )
    p.add_argument("--mqar-eval-every", type=int, default=d.mqar_eval_every)
    for prefix in ("lm", "pixel"):
        for name in ("steps", "batch", "width", "layers"):
            flag = f"--{prefix}-{name}"
            p.add_argument(flag, type=int, default=getattr(d, f"{prefix}_{name}"))
        p.add_argument(f"--{prefix}-lr", type=float, default=getattr(d, f"{prefix}_lr"))
    p.add_argument("--lm-context", type=int, default=d.lm_context)
    p.add_argument("--lm-eval-windows", type=int, default=d.lm_eval_windows)
    p.add_argument("--pixel-side", type=int, default=d.pixel_side, choices=[7, 14, 28])
    p.add_argument("--pixel-eval-images", type=int, default=d.pixel_eval_images)
    args = p.parse_args(argv)
    for task in args.tasks:
        if task not in TASKS:
            p.error(f"unknown task {task!r}; choose from {TASKS}")
    for kind in args.kinds:
        if kind not in KINDS:
            p.error(f"unknown kind {kind!r}; choose from {KINDS}")
    values = {k.replace("-", "_"): v for k, v in vars(args).items()}
    cells = values.pop("mqar_cells")
    out = values.pop("out")
    config = Config(**{k: v for k, v in values.items() if k in Config.__dataclass_fields__})
    config.mqar_cells = cells or ([(64, 4), (128, 8)] + ([(256, 16)] if args.full else []))
    config.mqar_lrs = args.mqar_lrs or (FULL_LRS if args.full else d.mqar_lrs)
    if config.quick:
        config = quick_config(config)
    if config.jit is None:
        config.jit = not config.quick  # XLA: 1.2-2× faster steps, 3-10 s more compiling
    config.out = out
    config.estimate_only = args.estimate
    config.merge = args.merge
    config.from_partial = args.from_partial
    return config


# ----------------------------------------------------------------------------
# Models and training


def kind_options(kind: str, width: int, config: Config) -> dict:
    """`build_causal_lm` arguments of a kind at this width: heads of
    `head_dim` (taylor: `taylor_head_dim`, as its feature dimension is
    1 + D + D²), the short convolution on the recurrences."""
    head_dim = config.taylor_head_dim if kind == "linear-taylor" else config.head_dim
    head_dim = min(head_dim, width)
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head dim {head_dim}")
    options = {"num_heads": width // head_dim, "attention": kind, "feature_map": "elu"}
    if kind.startswith("linear-"):
        options["attention"], options["feature_map"] = "linear", kind.split("-", 1)[1]
    if kind == "linear-taylor" and config.taylor_compact:
        from keras_linear_attention import TaylorFeatureMap, feature_maps

        # The same kernel with each product x_a x_b once: 153 features at D = 16, not
        # 273, a smaller state; but its gathers train slower (596 vs 380 ms a step at
        # MQAR (128, 8), d_model 128), so it is off by default.
        options["feature_map"] = feature_maps.serialize(TaylorFeatureMap(compact=True))
    if kind != "softmax" and not kind.startswith("linear") and config.conv_size:
        options["conv_size"] = config.conv_size
    return options


def build_lm(kind, vocabulary_size, width, layers, sequence_length, config, seed, name):
    import keras

    from keras_linear_attention import build_causal_lm

    keras.utils.set_random_seed(seed)  # same initial weights for a kind, every run
    return build_causal_lm(
        vocabulary_size,
        sequence_length=sequence_length,
        hidden_dim=width,
        num_layers=layers,
        position="learned",
        name=name,
        **kind_options(kind, width, config),
    )


def build_mixer_lm(kind, vocabulary_size, width, layers, sequence_length, config, seed, name):
    """Zoology's MQAR model: token + learned position embeddings, then
    `layers` pre-norm residual blocks of attention alone (Zoology's
    `state_mixer` is the identity: no feed-forward), final norm, LM head.
    The attention is the package's `CausalLinearAttention` (any recurrence and
    feature map) or Keras `MultiHeadAttention` with a causal mask."""
    import keras

    from keras_linear_attention import CausalLinearAttention, PositionEmbedding

    keras.utils.set_random_seed(seed)
    options = kind_options(kind, width, config)
    heads = options.pop("num_heads")
    tokens = keras.Input((None,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(vocabulary_size, width, name="token_embedding")(tokens)
    x = x + PositionEmbedding(sequence_length, name="position_embedding")(x)
    for i in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"norm_{i}")(x)
        if kind == "softmax":
            mixer = keras.layers.MultiHeadAttention(heads, width // heads, name=f"mixer_{i}")
            h = mixer(h, h, use_causal_mask=True)
        else:
            h = CausalLinearAttention(
                heads,
                width // heads,
                recurrence=options["attention"],
                feature_map=options["feature_map"],
                conv_size=options.get("conv_size"),
                name=f"mixer_{i}",
            )(h)
        x = x + h
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(vocabulary_size, name="lm_head")(x)
    return keras.Model(tokens, logits, name=name)


def at_positions(model):
    """`model` (token ids → logits at every position) rewired to take
    `(token ids, positions (B, P))` and run `final_norm` → `lm_head` at those
    P positions only; weights are shared with `model`."""
    import keras

    hidden = model.get_layer("final_norm").output
    positions = keras.Input((None,), dtype="int32", name="positions")
    picked = keras.ops.take_along_axis(hidden, keras.ops.expand_dims(positions, -1), axis=1)
    logits = model.get_layer("lm_head")(picked)
    return keras.Model([model.input, positions], logits, name=f"{model.name}_at_positions")


def state_bytes(model, length: int) -> dict:
    """Recurrent state per sequence, float32, summed over the attention
    layers; for softmax the K/V cache at `length` tokens (it grows)."""
    import keras

    from keras_linear_attention import CausalLinearAttention

    total, grows = 0, False
    for layer in _attention_layers(model):
        if isinstance(layer, CausalLinearAttention):
            total += 4 * sum(int(np.prod(shape)) for shape in layer.state_shapes)
        elif isinstance(layer, keras.layers.MultiHeadAttention):
            total += 4 * layer.num_heads * (layer.key_dim + layer.value_dim) * length
            grows = True
    return {"bytes": total, "grows_with_length": grows}


def _attention_layers(model):
    from keras_linear_attention import LinearTransformerDecoder

    for layer in model.layers:
        if isinstance(layer, LinearTransformerDecoder):
            yield layer.self_attention
        else:
            yield layer


def cosine_lr(step: int, total: int, peak: float, warmup_fraction: float = 0.1) -> float:
    """Linear warm-up over the first `warmup_fraction` of the steps, then
    cosine decay to 0 at `total`."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """One compiled train step per model, reused for every learning rate:
    `reset()` restores the initial weights and zeroes the optimizer, and the
    learning rate is a variable set before each step (cosine schedule)."""

    def __init__(self, model, jit: bool, weight_decay: float = 0.1):
        import keras
        import tensorflow as tf

        self.model = model
        self.initial_weights = [np.array(w) for w in model.get_weights()]
        self.optimizer = keras.optimizers.AdamW(
            1e-3, weight_decay=weight_decay, beta_2=0.98, global_clipnorm=1.0
        )
        self.optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def train_step(inputs, targets):
            with tf.GradientTape() as tape:
                logits = model(inputs, training=True)
                loss = loss_fn(targets, logits)
            grads = tape.gradient(loss, model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        def predict(inputs):
            return model(inputs, training=False)

        self._train_step = tf.function(train_step, jit_compile=jit, reduce_retracing=True)
        self._predict = tf.function(predict, jit_compile=jit, reduce_retracing=True)
        self.compile_seconds = 0.0
        self._compiled = False

    def reset(self):
        self.model.set_weights(self.initial_weights)
        for variable in self.optimizer.variables:
            variable.assign(np.zeros(variable.shape, variable.dtype))

    def compile(self, inputs, targets) -> None:
        """Trace and compile the train step with one step (undone by `reset`)."""
        if self._compiled:
            return
        start = time.perf_counter()
        float(self._train_step(inputs, targets))
        self.compile_seconds, self._compiled = time.perf_counter() - start, True

    def fit(self, batches, steps: int, peak_lr: float, on_eval=None, eval_every=0) -> dict:
        """Train `steps` steps from the initial weights. `batches(step)` gives
        `(inputs, targets)`; `on_eval(step)` (every `eval_every` steps)
        returning True stops early. Returns the training seconds (compilation
        and evaluations excluded), the steps run and the last loss."""
        self.compile(*batches(0))
        self.reset()
        seconds, loss, stopped = 0.0, float("nan"), None
        for step in range(steps):
            self.optimizer.learning_rate.assign(cosine_lr(step, steps, peak_lr))
            inputs, targets = batches(step)
            start = time.perf_counter()
            loss = float(self._train_step(inputs, targets))
            seconds += time.perf_counter() - start
            if on_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                if on_eval(step + 1):
                    stopped = step + 1
                    break
        if not math.isfinite(loss):
            print(f"    non-finite loss at lr {peak_lr:g}", flush=True)
        return {
            "seconds": seconds,
            "steps": stopped or steps,
            "final_loss": loss,
            "stopped_at": stopped,
        }

    def predict(self, inputs, batch_size: int = 250) -> np.ndarray:
        count = len(inputs[0]) if isinstance(inputs, (tuple, list)) else len(inputs)
        outs = []
        for start in range(0, count, batch_size):
            if isinstance(inputs, (tuple, list)):
                chunk = tuple(x[start : start + batch_size] for x in inputs)
            else:
                chunk = inputs[start : start + batch_size]
            outs.append(np.asarray(self._predict(chunk)))
        return np.concatenate(outs)


def log_softmax_nats(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy in nats of integer `targets` under `logits`."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(np.mean(log_z - picked))


def estimate_step_seconds(
    family: str, kind: str, tokens: int, layers: int, width: int, length: int
) -> float:
    """Seconds per training step from `STEP_SECONDS`: linear in tokens and
    layers, width^1.2 (fitted to the MQAR cells, within 25%); softmax's
    scores add a quarter of its cost per reference length."""
    ref, seconds = STEP_SECONDS[family]
    scale = (tokens / ref["tokens"]) * (layers / ref["layers"]) * (width / ref["width"]) ** 1.2
    if kind == "softmax":
        scale *= 0.75 + 0.25 * length / ref["length"]
    return seconds[kind] * scale


# ----------------------------------------------------------------------------
# Task 1: MQAR


def mqar_cell(config: Config, seq_len: int, kv: int, width: int, kinds: list) -> dict:
    """Every kind at one (T, KV, d_model): best accuracy over the learning rates."""
    vocab = max(config.mqar_vocab, 2 * seq_len)
    seed = config.seed
    train = mqar_data.generate(config.mqar_train_examples, seq_len, kv, vocab, seed=seed)
    test = mqar_data.generate(config.mqar_test_examples, seq_len, kv, vocab, seed=seed + 1)
    valid = mqar_data.generate(
        min(500, config.mqar_test_examples), seq_len, kv, vocab, seed=seed + 2
    )
    batch = config.mqar_batch
    order_rng = np.random.default_rng(seed)
    order = np.concatenate(
        [
            order_rng.permutation(len(train.inputs))
            for _ in range(-(-config.mqar_steps * batch // len(train.inputs)))
        ]
    )

    def batches(step):
        idx = order[step * batch : (step + 1) * batch]
        return (train.inputs[idx], train.positions[idx]), train.targets[idx]

    results = {}
    for kind in kinds:
        model = build_mixer_lm(
            kind, vocab, width, config.mqar_layers, seq_len, config, seed, "mqar"
        )
        trainer = Trainer(at_positions(model), config.jit)

        def accuracy(data, trainer=trainer):
            logits = trainer.predict((data.inputs, data.positions))
            return float(np.mean(np.argmax(logits, -1) == data.targets))

        runs = []
        for lr in config.mqar_lrs:

            def stop(step, acc=accuracy, lr=lr, kind=kind):
                value = acc(valid)
                print(f"    {kind} lr {lr:g} step {step}: validation {value:.3f}", flush=True)
                return value >= config.mqar_stop_at

            run = trainer.fit(batches, config.mqar_steps, lr, stop, config.mqar_eval_every)
            run.update(lr=lr, accuracy=accuracy(test))
            runs.append(run)
            print(
                f"  mqar T={seq_len} KV={kv} d={width} {kind:<16} lr {lr:<7g} "
                f"acc {run['accuracy']:.3f}  {run['seconds']:6.1f} s  "
                f"({run['steps']} steps{', stopped: solved' if run['stopped_at'] else ''})",
                flush=True,
            )
            if run["accuracy"] >= config.mqar_stop_at:
                break
        best = max(runs, key=lambda r: r["accuracy"])
        results[kind] = {
            "accuracy": best["accuracy"],
            "lr": best["lr"],
            "train_seconds": best["seconds"],
            "steps": best["steps"],
            "learning_rates": config.mqar_lrs,
            "sweep_seconds": sum(r["seconds"] for r in runs),
            "compile_seconds": trainer.compile_seconds,
            "state": state_bytes(model, seq_len),
            "parameters": int(model.count_params()),
            "runs": runs,
        }
    return {
        "seq_len": seq_len,
        "num_kv_pairs": kv,
        "d_model": width,
        "vocab_size": vocab,
        "softmax_learned": _softmax_learned(results),
        "kinds": results,
    }


def run_mqar(config: Config) -> dict:
    cells = []
    for seq_len, kv in config.mqar_cells:
        for width in config.mqar_dims:
            cells.append(mqar_cell(config, seq_len, kv, width, config.kinds))
            # A long run that is stopped keeps its finished cells.
            os.makedirs(config.out, exist_ok=True)
            with open(os.path.join(config.out, "mqar_partial.json"), "w") as f:
                json.dump(cells, f, indent=1)
    return mqar_report(config, cells)


def _softmax_learned(kinds: dict) -> bool | None:
    """Whether softmax learned a cell (None: not run), which makes it comparable."""
    softmax = kinds.get("softmax", {}).get("accuracy")
    return None if softmax is None else softmax >= SOFTMAX_LEARNED


def mqar_report(config: Config, cells: list) -> dict:
    return {
        "cells": cells,
        "layers": config.mqar_layers,
        "steps": config.mqar_steps,
        "batch_size": config.mqar_batch,
        "train_examples": config.mqar_train_examples,
        "test_examples": config.mqar_test_examples,
        "learning_rates": config.mqar_lrs,
        "stop_at": config.mqar_stop_at,
        "head_dim": config.head_dim,
        "taylor_head_dim": config.taylor_head_dim,
        "conv_size": config.conv_size,
    }


def fit_and_score(model, config: Config, batches, steps, lr, eval_x, eval_y) -> dict:
    """Train a next-token model; held-out cross-entropy in bits per token."""
    trainer = Trainer(model, config.jit, weight_decay=0.01)
    run = trainer.fit(batches, steps, lr)
    start = time.perf_counter()
    logits = trainer.predict(eval_x, batch_size=16)
    bits = log_softmax_nats(logits, eval_y) / math.log(2)
    return {
        "bits": bits,
        "train_seconds": run["seconds"],
        "compile_seconds": trainer.compile_seconds,
        "eval_seconds": time.perf_counter() - start,
        "final_train_loss_bits": run["final_loss"] / math.log(2),
        "state": state_bytes(model, eval_x.shape[1]),
        "parameters": int(model.count_params()),
    }


# ----------------------------------------------------------------------------
# Task 2: character LM on the KJV


def kjv_bytes(split: str, data_dir) -> np.ndarray:
    from keras_linear_attention.datasets import kjv_bible

    verses = kjv_bible.load(split, data_dir, shuffle_files=False)
    text = b"\n".join(v for v in verses.as_numpy_iterator()) + b"\n"
    return np.frombuffer(text, np.uint8).astype(np.int32)


def run_lm(config: Config) -> dict:
    train, test = kjv_bytes("train", config.data_dir), kjv_bytes("test", config.data_dir)
    ctx, batch = config.lm_context, config.lm_batch
    offsets = np.random.default_rng(config.seed).integers(
        0, len(train) - ctx - 1, size=(config.lm_steps, batch)
    )
    windows = min(config.lm_eval_windows, (len(test) - 1) // ctx)
    test_x = np.stack([test[i * ctx : (i + 1) * ctx] for i in range(windows)])
    test_y = np.stack([test[i * ctx + 1 : (i + 1) * ctx + 1] for i in range(windows)])

    def batches(step):
        idx = offsets[step][:, None] + np.arange(ctx + 1)
        chunk = train[idx]
        return chunk[:, :-1], chunk[:, 1:]

    results = {}
    for kind in config.kinds:
        model = build_lm(
            kind, 256, config.lm_width, config.lm_layers, ctx, config, config.seed, "kjv"
        )
        run = fit_and_score(model, config, batches, config.lm_steps, config.lm_lr, test_x, test_y)
        results[kind] = {"bits_per_char": run.pop("bits"), **run}
        print(
            f"  lm {kind:<16} {results[kind]['bits_per_char']:.3f} bits/char  "
            f"{run['train_seconds']:6.1f} s",
            flush=True,
        )
    return {
        "kinds": results,
        "steps": config.lm_steps,
        "batch_size": batch,
        "context": ctx,
        "width": config.lm_width,
        "layers": config.lm_layers,
        "learning_rate": config.lm_lr,
        "eval_characters": int(test_y.size),
        "train_characters": int(len(train)),
    }


# ----------------------------------------------------------------------------
# Task 3: pixels


START = 256  # token before the first pixel; pixels are 0 … 255


def fashion_pixels(split: str, side: int, data_dir) -> np.ndarray:
    """`(N, side²)` int32 grey levels 0 … 255, row by row, area-downsampled."""
    import tensorflow_datasets as tfds

    from keras_linear_attention.datasets import fashion_mnist

    images, _ = tfds.as_numpy(fashion_mnist.load(split, data_dir, batch_size=-1))
    images = images[..., 0].astype(np.float64)
    factor = 28 // side
    images = images.reshape(len(images), side, factor, side, factor).mean((2, 4))
    return np.round(images).astype(np.int32).reshape(len(images), side * side)


def run_pixels(config: Config) -> dict:
    kinds = [k for k in config.kinds if k in PIXEL_KINDS]
    if not kinds:
        return {"kinds": {}, "skipped": f"--kinds has none of {PIXEL_KINDS}"}
    side, batch = config.pixel_side, config.pixel_batch
    split = f"train[:{config.pixel_train_images}]" if config.pixel_train_images else "train"
    train = fashion_pixels(split, side, config.data_dir)
    test = fashion_pixels(f"test[:{config.pixel_eval_images}]", side, config.data_dir)
    length = side * side
    shift = lambda x: np.concatenate([np.full((len(x), 1), START, np.int32), x[:, :-1]], 1)
    picks = np.random.default_rng(config.seed).integers(
        0, len(train), size=(config.pixel_steps, batch)
    )

    def batches(step):
        images = train[picks[step]]
        return shift(images), images

    results = {}
    for kind in kinds:
        width, layers = config.pixel_width, config.pixel_layers
        model = build_lm(kind, START + 1, width, layers, length, config, config.seed, "pixels")
        run = fit_and_score(
            model, config, batches, config.pixel_steps, config.pixel_lr, shift(test), test
        )
        results[kind] = {"bits_per_dim": run.pop("bits"), **run}
        print(
            f"  pixels {kind:<16} {results[kind]['bits_per_dim']:.3f} bits/dim  "
            f"{run['train_seconds']:6.1f} s",
            flush=True,
        )
    return {
        "kinds": results,
        "side": side,
        "levels": 256,
        "steps": config.pixel_steps,
        "batch_size": batch,
        "width": config.pixel_width,
        "layers": config.pixel_layers,
        "learning_rate": config.pixel_lr,
        "eval_images": int(len(test)),
    }


# ----------------------------------------------------------------------------
# Estimate, targets, report


def estimate_seconds(config: Config) -> dict:
    """Training seconds per task from `STEP_SECONDS`, plus about 10 s of
    compilation per model: MQAR as `(one learning rate each, every learning
    rate)` without early stops (a run stops once it solves the task, and a
    kind's remaining learning rates are then skipped)."""
    est = {}
    if "mqar" in config.tasks:
        once = 0.0
        for seq_len, _ in config.mqar_cells:
            for width in config.mqar_dims:
                for kind in config.kinds:
                    tokens = config.mqar_batch * seq_len
                    per = estimate_step_seconds(
                        "mixer", kind, tokens, config.mqar_layers, width, seq_len
                    )
                    once += per * config.mqar_steps + 10
        est["mqar"] = (once, once * len(config.mqar_lrs))
    for task, prefix, length, kinds in (
        ("lm", "lm", config.lm_context, config.kinds),
        ("pixels", "pixel", config.pixel_side**2, [k for k in config.kinds if k in PIXEL_KINDS]),
    ):
        if task not in config.tasks:
            continue
        batch, steps = getattr(config, f"{prefix}_batch"), getattr(config, f"{prefix}_steps")
        layers, width = getattr(config, f"{prefix}_layers"), getattr(config, f"{prefix}_width")
        seconds = sum(
            estimate_step_seconds("block", k, batch * length, layers, width, length) * steps + 10
            for k in kinds
        )
        est[task] = (seconds, seconds)
    return est


def _best_linear(scores: dict, lower_is_better: bool):
    linear = {k: v for k, v in scores.items() if k != "softmax" and v is not None}
    if not linear:
        return None, None
    pick = min if lower_is_better else max
    kind = pick(linear, key=linear.get)
    return kind, linear[kind]


def targets(report: dict, quick: bool) -> list:
    """The issue's targets, each with a status."""
    rows = []
    if quick:
        return [{"target": "all", "status": "not evaluated (--quick)"}]
    mqar = report.get("mqar")
    if mqar:
        for seq_len, kv in ((128, 8), (256, 16)):
            cell = next(
                (
                    c
                    for c in mqar["cells"]
                    if (c["seq_len"], c["num_kv_pairs"], c["d_model"]) == (seq_len, kv, 128)
                ),
                None,
            )
            name = (
                f"MQAR ({seq_len}, {kv}) d_model 128: best linear-time ≥ 0.95 "
                "and ≤ 3 points below softmax"
            )
            if cell is None:
                if (seq_len, kv) == (128, 8):
                    rows.append({"target": name, "status": "not run"})
                continue
            scores = {k: v["accuracy"] for k, v in cell["kinds"].items()}
            rows.append(_mqar_target(name, scores))
    lm = report.get("lm")
    if lm and lm["kinds"]:
        scores = {k: v["bits_per_char"] for k, v in lm["kinds"].items()}
        rows.append(
            _ratio_target(
                "Char LM: best linear-time bits/char ≤ 1.02× softmax", scores, LM_TARGET_RATIO
            )
        )
    pixels = report.get("pixels")
    if pixels and pixels.get("kinds"):
        scores = {k: v["bits_per_dim"] for k, v in pixels["kinds"].items()}
        name = "Pixels: best linear-time bits/dim ≤ 1.04× softmax"
        row = _ratio_target(name, scores, PIXEL_TARGET_RATIO)
        if "ratio" in row and row["best_kind"] != "linear-elu" and "linear-elu" in scores:
            # The paper's own comparison is softmax against elu+1.
            elu = scores["linear-elu"] / scores["softmax"]
            row["status"] += f"; the paper's linear-elu: {elu:.3f}×"
        rows.append(row)
    return rows


def _mqar_target(name: str, scores: dict) -> dict:
    softmax = scores.get("softmax")
    kind, best = _best_linear(scores, lower_is_better=False)
    row = {"target": name, "softmax": softmax, "best_kind": kind, "best": best}
    if softmax is None or kind is None:
        row["status"] = "not run (needs softmax and a linear-time kind)"
    elif softmax < SOFTMAX_LEARNED:
        row["status"] = f"not comparable (softmax did not learn: {softmax:.3f} < 0.95)"
    elif best >= SOFTMAX_LEARNED and best >= softmax - TARGET_GAP_POINTS:
        row["status"] = "met"
    else:
        row["status"] = (
            f"not met ({kind} {best:.3f}, softmax {softmax:.3f}: "
            f"{100 * (softmax - best):.1f} points below)"
        )
    return row


def _ratio_target(name: str, scores: dict, limit: float) -> dict:
    softmax = scores.get("softmax")
    kind, best = _best_linear(scores, lower_is_better=True)
    row = {"target": name, "softmax": softmax, "best_kind": kind, "best": best}
    if softmax is None or kind is None:
        row["status"] = "not run (needs softmax and a linear-time kind)"
        return row
    row["ratio"] = best / softmax
    verdict = "met" if row["ratio"] <= limit else "not met"
    row["status"] = f"{verdict} ({kind}: {row['ratio']:.3f}× softmax, limit {limit}×)"
    return row


def _bytes(state: dict) -> str:
    value = state["bytes"]
    text = f"{value / 1024:.1f} KiB" if value >= 1024 else f"{value} B"
    return text + (" (K/V cache, grows)" if state["grows_with_length"] else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def markdown(report: dict) -> str:
    lines = ["# Quality benchmark", ""]
    meta = report["meta"]
    lines += [
        f"Run: {meta['date']}, {meta['processor']}, {meta['seconds']:.0f} s in all"
        + (" (--quick: numbers mean nothing)" if meta["quick"] else "")
        + ".",
        "",
    ]
    if meta.get("merged"):
        tasks = ", ".join(f"{task} ({date})" for task, date in meta["merged"].items())
        lines += [
            f"Tasks from earlier runs (`--merge`): {tasks}. Rows from earlier runs in "
            "this run's tasks are listed under their tables.",
            "",
        ]
    mqar = report.get("mqar")
    if mqar:
        lines += [
            f"## MQAR ({_count(mqar['layers'], 'layer')}, {mqar['steps']} steps × batch "
            f"{mqar['batch_size']}, {mqar['train_examples']} training examples, best of "
            f"{_learning_rates(mqar)}, test accuracy on "
            f"{mqar['test_examples']} held-out examples)",
            "",
            f"Model: Zoology's, token and learned position embeddings, {mqar['layers']} "
            "pre-norm blocks of attention alone (no feed-forward), LM head at the query "
            f"positions only. Heads of {mqar['head_dim']} (linear-taylor: "
            f"{mqar['taylor_head_dim']}); short convolution on the recurrences: "
            f"{mqar['conv_size'] or 'none'}. A run stops once its validation accuracy reaches "
            f"{mqar['stop_at']}, and the kind's remaining learning rates are then skipped; "
            "`train s` is the reported run's training time (compilation and evaluation "
            "excluded), `steps` its steps. Chance is about 1/KV (a value from the context).",
            "",
        ]
        if mqar.get("from_partial"):
            lines += ["The cells below are those a stopped run had finished.", ""]
        lines += _cell_notes(mqar)
        lines += [
            "| T, KV | d_model | kind | accuracy | lr | steps | train s | state / sequence "
            "| comparable |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for cell in mqar["cells"]:
            learned = cell["softmax_learned"]
            comparable = (
                "softmax not run"
                if learned is None
                else ("yes" if learned else "no: softmax did not learn (< 0.95)")
            )
            for kind, r in cell["kinds"].items():
                lines.append(
                    f"| ({cell['seq_len']}, {cell['num_kv_pairs']}) | {cell['d_model']} | "
                    f"{kind} | {r['accuracy']:.3f} | {r['lr']:g} | {r['steps']} | "
                    f"{r['train_seconds']:.0f} | {_bytes(r['state'])} | {comparable} |"
                )
        lines.append("")
    for task, metric, unit in (
        ("lm", "bits_per_char", "bits/char"),
        ("pixels", "bits_per_dim", "bits/dim"),
    ):
        data = report.get(task)
        if not data or not data.get("kinds"):
            continue
        if task == "lm":
            title = (
                f"## Character LM, KJV ({_count(data['layers'], 'layer')}, width {data['width']}, "
                f"context {data['context']}, {data['steps']} steps × batch {data['batch_size']}, "
                f"lr {data['learning_rate']:g}; held-out {data['eval_characters']} characters)"
            )
        else:
            title = (
                f"## Pixels, Fashion-MNIST {data['side']}×{data['side']}, 256 levels "
                f"({_count(data['layers'], 'layer')}, width {data['width']}, "
                f"{data['steps']} steps × batch {data['batch_size']}; "
                f"held-out {data['eval_images']} images)\n\n"
                "The paper's MNIST 28×28, fully trained: softmax 0.621, linear 0.644 (1.037×)."
            )
        softmax = data["kinds"].get("softmax", {}).get(metric)
        lines += [
            title,
            "",
            f"| kind | {unit} | × softmax | train s | state / sequence |",
            "|---|---|---|---|---|",
        ]
        for kind, r in data["kinds"].items():
            ratio = f"{r[metric] / softmax:.3f}" if softmax else "n/a"
            lines.append(
                f"| {kind} | {r[metric]:.3f} | {ratio} | {r['train_seconds']:.0f} | "
                f"{_bytes(r['state'])} |"
            )
        earlier = {k: r["merged_from"] for k, r in data["kinds"].items() if "merged_from" in r}
        if earlier:
            runs = ", ".join(f"{k} ({date})" for k, date in earlier.items())
            lines += ["", f"From an earlier run of the same settings: {runs}."]
        lines.append("")
    lines += ["## Targets (issue 17)", "", "| target | status |", "|---|---|"]
    lines += [f"| {t['target']} | {t['status']} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def _cell_name(cell: dict) -> str:
    return f"({cell['seq_len']}, {cell['num_kv_pairs']}) d_model {cell['d_model']}"


def _kinds_by_rates(mqar: dict, cell: dict) -> dict:
    """{str(learning rates swept): [kinds]} for one cell."""
    groups = {}
    for kind, r in _rates_per_kind(mqar, cell)["kinds"].items():
        groups.setdefault(str(r["learning_rates"]), []).append(kind)
    return groups


def _sweeps(mqar: dict) -> set:
    """The distinct learning-rate sweeps of every kind in every cell."""
    return {lrs for c in mqar["cells"] for lrs in _kinds_by_rates(mqar, c)}


def _learning_rates(mqar: dict) -> str:
    sweeps = _sweeps(mqar)
    return f"learning rates {sweeps.pop()}" if len(sweeps) == 1 else "the learning rates below"


def _cell_notes(mqar: dict) -> list:
    """Lines on what differs between the cells: the learning rates each kind
    swept, and the kinds merged from an earlier run."""
    lines = []
    if len(_sweeps(mqar)) > 1:
        tried = []
        for c in mqar["cells"]:
            groups = _kinds_by_rates(mqar, c).items()
            tried.append(
                f"{_cell_name(c)}: " + ", ".join(f"{lrs} for {', '.join(k)}" for lrs, k in groups)
            )
        lines += [f"Learning rates swept: {'; '.join(tried)}.", ""]
    earlier = {}
    for c in mqar["cells"]:
        for kind, r in c["kinds"].items():
            if "merged_from" in r:
                earlier.setdefault(f"{_cell_name(c)} ({r['merged_from']})", []).append(kind)
    if earlier:
        text = "; ".join(f"{cell}: {', '.join(kinds)}" for cell, kinds in earlier.items())
        lines += [f"From an earlier run of the same settings: {text}.", ""]
    return lines


def plot_mqar(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["mqar"]["cells"]
    keys = sorted({(c["seq_len"], c["num_kv_pairs"]) for c in cells})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (seq_len, kv) in zip(axes[0], keys, strict=True):
        mine = sorted(
            (c for c in cells if (c["seq_len"], c["num_kv_pairs"]) == (seq_len, kv)),
            key=lambda c: c["d_model"],
        )
        kinds = list(dict.fromkeys(k for c in mine for k in c["kinds"]))
        for kind in kinds:
            dims = [c["d_model"] for c in mine if kind in c["kinds"]]
            accs = [c["kinds"][kind]["accuracy"] for c in mine if kind in c["kinds"]]
            style = {"linewidth": 2.5, "color": "black"} if kind == "softmax" else {}
            ax.plot(dims, accs, marker="o", label=kind, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks([c["d_model"] for c in mine], [str(c["d_model"]) for c in mine])
        ax.set_ylim(0, 1.02)
        ax.axhline(SOFTMAX_LEARNED, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"MQAR T={seq_len}, KV={kv}")
        ax.set_xlabel("d_model")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def processor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def merge_earlier(report: dict, config: Config) -> dict:
    """Copy the tasks this run skipped from the quality.json already under
    `--out`, so that tasks measured in separate runs land in one table; returns
    {task: date of the run that measured it}."""
    path = os.path.join(config.out, "quality.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    meta = earlier.get("meta", {})
    merged = {}
    for task in (t for t in TASKS if t in earlier):
        date = meta.get("merged", {}).get(task, meta.get("date"))  # when it was measured
        if task not in report:
            report[task], merged[task] = earlier[task], date
        elif task == "mqar":
            _merge_cells(report[task], earlier[task], date)
        else:
            _merge_kinds(report[task], earlier[task], date)
    return merged


# Settings that make two MQAR runs' cells comparable (the learning rates may
# differ: a kind keeps its best run over both sweeps, as Zoology reports).
_MQAR_KEYS = ("layers", "steps", "batch_size", "train_examples", "test_examples", "stop_at")


def _merge_cells(mqar: dict, earlier: dict, date) -> None:
    """Add to this run's MQAR what an earlier run of the same settings
    measured: its other cells, and in a cell both measured, each kind's best
    run over both sweeps. Cells are ordered by (T, KV, d_model descending)."""
    if any(mqar.get(k) != earlier.get(k) for k in _MQAR_KEYS):
        return
    key = lambda c: (c["seq_len"], c["num_kv_pairs"], c["d_model"])  # noqa: E731
    cells = {key(c): _rates_per_kind(mqar, c) for c in mqar["cells"]}
    for cell in earlier["cells"]:
        cell = _rates_per_kind(earlier, cell)
        mine = cells.setdefault(key(cell), {**cell, "kinds": {}})
        for kind, result in cell["kinds"].items():
            result = {**result, "merged_from": result.get("merged_from", date)}
            mine["kinds"][kind] = _best_sweep(mine["kinds"].get(kind), result)
        mine["kinds"] = {k: mine["kinds"][k] for k in KINDS if k in mine["kinds"]}
        mine["softmax_learned"] = _softmax_learned(mine["kinds"])
    mqar["cells"] = sorted(cells.values(), key=lambda c: (*key(c)[:2], -c["d_model"]))


def _rates_per_kind(mqar: dict, cell: dict) -> dict:
    """`cell` with each kind's swept learning rates and merge date in its
    result (older runs kept them per cell, or for the whole run)."""
    lrs = cell.get("learning_rates", mqar["learning_rates"])
    kinds = {k: {"learning_rates": lrs, **r} for k, r in cell["kinds"].items()}
    rest = {k: v for k, v in cell.items() if k not in ("learning_rates", "merged_from")}
    if "merged_from" in cell:
        kinds = {k: {"merged_from": cell["merged_from"], **r} for k, r in kinds.items()}
    return {**rest, "kinds": kinds}


def _best_sweep(mine: dict | None, earlier: dict) -> dict:
    """One kind swept in two runs: the better run (this one's on a tie),
    with both sweeps' runs, learning rates and seconds."""
    if mine is None:
        return earlier
    best = max(mine, earlier, key=lambda r: r["accuracy"])
    return {
        **best,
        "learning_rates": list(dict.fromkeys(earlier["learning_rates"] + mine["learning_rates"])),
        "runs": earlier["runs"] + mine["runs"],
        "sweep_seconds": mine["sweep_seconds"] + earlier["sweep_seconds"],
    }


# Settings that make two runs of a task comparable, kind by kind.
_RUN_KEYS = ("side", "context", "steps", "batch_size", "width", "layers", "learning_rate")


def _merge_kinds(task: dict, earlier: dict, date) -> None:
    """Add to this run's `task` the kinds an earlier run of the same settings
    measured and this one did not (softmax first, as the ratios' baseline);
    each keeps a `merged_from` date."""
    if any(task.get(k) != earlier.get(k) for k in _RUN_KEYS):
        return
    kinds = {}
    for kind, result in earlier["kinds"].items():
        if kind not in task["kinds"]:
            kinds[kind] = {**result, "merged_from": result.get("merged_from", date)}
    kinds.update(task["kinds"])
    task["kinds"] = {k: kinds[k] for k in KINDS if k in kinds}


def main(argv=None) -> dict:
    config = parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per model: retrace warnings
    start = time.time()
    estimate = estimate_seconds(config)
    print(
        f"quality benchmark: tasks {config.tasks}, kinds {config.kinds}"
        + (" (--quick)" if config.quick else ""),
        flush=True,
    )
    low = sum(v[0] for v in estimate.values())
    high = sum(v[1] for v in estimate.values())
    print(
        "estimated training time (2-core AMD EPYC; MQAR: one learning rate each … every "
        "learning rate, before early stops): "
        + ", ".join(f"{t} {a / 60:.0f}…{b / 60:.0f} min" for t, (a, b) in estimate.items())
        + f"; total {low / 3600:.1f}…{high / 3600:.1f} h",
        flush=True,
    )
    if getattr(config, "estimate_only", False):
        return {"estimate": estimate}
    report: dict = {}
    runners = {"mqar": run_mqar, "lm": run_lm, "pixels": run_pixels}
    if config.from_partial:
        with open(os.path.join(config.out, "mqar_partial.json")) as f:
            cells = json.load(f)
        report["mqar"] = {**mqar_report(config, cells), "from_partial": True, "seconds": 0.0}
        runners = {}
    for task in (t for t in config.tasks if t in runners):
        print(f"{task}:", flush=True)
        task_start = time.time()
        report[task] = runners[task](config)
        report[task]["seconds"] = time.time() - task_start
        print(f"{task}: {report[task]['seconds']:.0f} s in all", flush=True)
    merged = merge_earlier(report, config) if config.merge else {}
    report["targets"] = targets(report, config.quick)
    report["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "processor": processor(),
        "seconds": time.time() - start,
        "estimated_seconds": estimate,
        "quick": config.quick,
        "config": {k: v for k, v in vars(config).items()},
        "merged": merged,
    }
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "quality.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(config.out, "quality.md"), "w") as f:
        f.write(markdown(report))
    if report.get("mqar"):
        plot_mqar(report, os.path.join(config.out, "mqar.png"))
    for row in report["targets"]:
        print(f"target: {row['target']}: {row['status']}", flush=True)
    print(f"wrote {config.out}/quality.json, quality.md, mqar.png in {time.time() - start:.0f} s")
    return report


if __name__ == "__main__":
    main()
