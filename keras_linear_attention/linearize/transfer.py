"""`attention_transfer`: fit a linearized model's new weights to its softmax twin.

Teacher forcing, as in Hedgehog and LoLCATs: each step runs the softmax
model once, recording every attention layer's call (its inputs, masks and
output, and with `objective="attention_weights"` its attention weights) by
wrapping the layer's `call` for the duration of that forward pass; then each
linear layer is called on the very inputs its softmax counterpart received,
and the summed per-layer loss trains only the weights softmax attention does
not have (φ's, a recurrence's): the MSE between the two outputs (LoLCATs),
or the cross-entropy between the two attention-weight matrices (Hedgehog).
Layers train independently of each other's errors, all in one pass, and
nothing else in either model changes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_linear_attention.layers import CausalLinearAttention, LinearMultiHeadAttention
from keras_linear_attention.linearize._common import (
    MHA_CALL,
    attention_layers,
    is_softmax_attention,
    new_weights,
)


def attention_transfer(
    softmax_model: keras.Model,
    linear_model: keras.Model,
    dataset: Any,
    steps: int = 300,
    learning_rate: float = 3e-2,
    *,
    optimizer: keras.optimizers.Optimizer | None = None,
    objective: str = "outputs",
    jit_compile: bool = False,
    verbose: int = 1,
) -> dict[str, list[float]]:
    """Train `linear_model`'s new attention weights to reproduce `softmax_model`'s attention.

    For each softmax attention layer of `softmax_model` whose counterpart
    (same place, same name) in `linear_model` is linear, the linear layer
    is called on the inputs the softmax layer received (teacher forcing) and
    the loss is the mean squared difference of their outputs, summed over
    layers. Only the weights softmax attention lacks are trained (φ's,
    e.g. Hedgehog's maps, and a gated or delta recurrence's); every other
    weight of both models stays as it is. Afterwards, an ordinary
    `linear_model.fit` fine-tunes the whole model.

    Args:
        softmax_model: The trained softmax model (only run, in inference mode).
        linear_model: `linearize(softmax_model, ...)`, or any model with the
            same attention layers, by name and place, made linear.
        dataset: Batches as `fit` takes them (`x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)`; only `x` is used): a `tf.data.Dataset`,
            a list or another iterable. It is iterated again when exhausted,
            unless it is a one-shot iterator.
        steps: Optimizer steps.
        learning_rate: For the default optimizer, Adam.
        optimizer: A Keras optimizer instead of Adam.
        objective: `"outputs"` (default): the MSE between the two layers'
            outputs. `"attention_weights"`: Hedgehog's loss, the
            cross-entropy `−Σ_j a_ij log â_ij` of the linear layer's
            normalised kernel weights `â` against the softmax weights `a`,
            averaged over queries; it builds both `(B, H, T, S)` matrices, so
            memory grows with T·S, and needs `recurrence="linear"`.
        jit_compile: Compile each step with XLA.
        verbose: 0 silent, 1 a progress bar with the running mean of the
            total and per-layer losses, 2 one line at the end.

    Returns:
        `{"loss": [...], "<layer path>": [...], ...}`: per step, the total
        and each layer's loss (before that step's update).

    Example:

    >>> import keras_linear_attention as kla
    >>> softmax = kla.build_causal_lm(
    ...     32, sequence_length=8, hidden_dim=8, num_heads=2, num_layers=1, attention="softmax")
    >>> linear = kla.linearize(softmax)  # trainable Hedgehog feature maps
    >>> tokens = np.arange(32, dtype="int32").reshape(4, 8)
    >>> history = kla.attention_transfer(softmax, linear, [tokens], steps=2, verbose=0)
    >>> sorted(history), len(history["loss"])
    (['decoder_0/self_attention', 'loss'], 2)
    """
    _check_args(steps, learning_rate, optimizer, jit_compile, verbose, dataset)
    pairs = _pairs(softmax_model, linear_model)
    _check_objective(objective, pairs)
    variables = [w for _, _, linear in pairs for w in new_weights(linear) if w.trainable]
    if not variables:
        raise ValueError(
            "The linear attention layers have no new trainable weights: the feature map is "
            "parameter-free (e.g. 'elu'). linearize with feature_map='hedgehog' (the "
            "default), or fine-tune with fit instead."
        )
    optimizer = optimizer or keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)
    step = _step_function(softmax_model, pairs, variables, optimizer, objective, jit_compile)
    names = [path for path, _, _ in pairs]
    history: dict[str, list[float]] = {"loss": [], **{name: [] for name in names}}
    progbar = keras.utils.Progbar(steps, verbose=verbose, unit_name="step")
    batches = _batches(dataset)
    for i in range(steps):
        x = next(batches, None)
        if x is None:
            warnings.warn(f"`dataset` ran out after {i} of {steps} steps.", stacklevel=2)
            break
        losses = [float(loss) for loss in step(x)]
        history["loss"].append(sum(losses))
        for name, loss in zip(names, losses, strict=True):
            history[name].append(loss)
        progbar.update(i + 1, [("loss", sum(losses)), *zip(names, losses, strict=True)])
    return history


def _check_args(steps, learning_rate, optimizer, jit_compile, verbose, dataset) -> None:
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "attention_transfer runs on the TensorFlow backend; "
            f"this is {keras.backend.backend()!r}."
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive int; received {steps!r}.")
    if optimizer is None and not (
        isinstance(learning_rate, (int, float))
        and not isinstance(learning_rate, bool)
        and learning_rate > 0
    ):
        raise ValueError(f"`learning_rate` must be a positive float; received {learning_rate!r}.")
    if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"`optimizer` must be a keras Optimizer; received {optimizer!r}.")
    if not isinstance(jit_compile, bool):
        raise TypeError(f"`jit_compile` must be True or False; received {jit_compile!r}.")
    if verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 0, 1 or 2; received {verbose!r}.")
    if isinstance(dataset, np.ndarray) or ops.is_tensor(dataset):
        raise TypeError(
            "`dataset` must yield batches, not be one array: wrap it, e.g. "
            "`tf.data.Dataset.from_tensor_slices(x).batch(32)` or `[x]` for one batch."
        )


OBJECTIVES = ("outputs", "attention_weights")


def _check_objective(objective: Any, pairs: list) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}; received {objective!r}.")
    if objective == "attention_weights":
        other = [path for path, _, lin in pairs if getattr(lin, "recurrence", "linear") != "linear"]
        if other:
            raise ValueError(
                "`objective='attention_weights'` needs recurrence='linear' (normalised kernel "
                f"weights); layers {other} use another recurrence: use objective='outputs'."
            )


def _pairs(softmax_model, linear_model) -> list[tuple[str, Any, Any]]:
    """`(path, softmax layer, linear layer)` for each attention layer to transfer."""
    softmax, linear = attention_layers(softmax_model), attention_layers(linear_model)
    if [p for p, _ in softmax] != [p for p, _ in linear]:
        raise ValueError(
            "`linear_model` must have the attention layers of `softmax_model`, by name and "
            f"place (as `linearize` makes it); found {[p for p, _ in softmax]} and "
            f"{[p for p, _ in linear]}."
        )
    pairs = [
        (path, s, lin)
        for (path, s), (_, lin) in zip(softmax, linear, strict=True)
        if is_softmax_attention(s) and isinstance(lin, LinearMultiHeadAttention)
    ]
    if not pairs:
        raise ValueError(
            "No softmax attention layer of `softmax_model` is linear in `linear_model`: "
            "nothing to transfer."
        )
    return pairs


def _step_function(softmax_model, pairs, variables, optimizer, objective, jit_compile):
    import tensorflow as tf

    softmax_layers = [s for _, s, _ in pairs]
    weights = objective == "attention_weights"
    layer_loss = _weights_loss if weights else _layer_loss

    def step(x):
        with _recording(softmax_layers, weights) as calls:
            softmax_model(x, training=False)
        with tf.GradientTape() as tape:
            losses = [
                layer_loss(path, linear, recorded)
                for (path, _, linear), recorded in zip(pairs, calls, strict=True)
            ]
            total = ops.sum(ops.stack(losses))
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables, strict=True))
        return losses

    return tf.function(step, jit_compile=jit_compile, reduce_retracing=True, autograph=False)


@contextlib.contextmanager
def _recording(layers, weights: bool = False) -> Iterator[list[list[tuple]]]:
    """Record each layer's `call` arguments and output (with `weights`: its
    attention weights instead) while the block runs."""
    calls: list[list[tuple]] = [[] for _ in layers]
    for layer, record in zip(layers, calls, strict=True):
        original = layer.call

        def call(*args, _original=original, _record=record, **kwargs):
            if not weights:
                out = _original(*args, **kwargs)
                _record.append((args, kwargs, out))
                return out
            asked = kwargs.pop("return_attention_scores", False)
            out, scores = _original(*args, return_attention_scores=True, **kwargs)
            _record.append((args, kwargs, scores))
            return (out, scores) if asked else out

        layer.call = call  # an instance attribute, shadowing the method until deleted
    try:
        yield calls
    finally:
        for layer in layers:
            del layer.call


def _layer_loss(path, linear, recorded):
    _check_recorded(path, recorded)
    losses = []
    for args, kwargs, target in recorded:
        out = _call_linear(linear, args, kwargs)
        out, target = (t[0] if isinstance(t, (tuple, list)) else t for t in (out, target))
        target = ops.stop_gradient(ops.cast(target, "float32"))
        losses.append(ops.mean(ops.square(ops.cast(out, "float32") - target)))
    return ops.mean(ops.stack(losses))


def _weights_loss(path, linear, recorded):
    """Hedgehog's loss: the cross-entropy of the linear layer's attention
    weights against the recorded softmax weights, averaged over queries."""
    _check_recorded(path, recorded)
    losses = []
    for args, kwargs, target in recorded:
        call = MHA_CALL.bind(None, *args, **kwargs).arguments
        call.pop("self", None)
        call["return_attention_scores"] = True
        # The recurrent layer's own call has no weights; the base class's does.
        _, weights = LinearMultiHeadAttention.call(linear, **call)
        target = ops.stop_gradient(ops.cast(target, "float32"))
        log_weights = ops.log(ops.maximum(ops.cast(weights, "float32"), 1e-9))
        losses.append(-ops.mean(ops.sum(target * log_weights, axis=-1)))
    return ops.mean(ops.stack(losses))


def _check_recorded(path, recorded) -> None:
    if not recorded:
        raise ValueError(
            f"The softmax attention layer {path!r} did not run in softmax_model(x); "
            "attention_transfer needs every converted layer on the path from the inputs."
        )


def _call_linear(linear, args, kwargs):
    """Call `linear` as its softmax counterpart was called. The recurrent
    `CausalLinearAttention` takes one sequence and a padding mask where a
    causal self-attention `MultiHeadAttention` takes query, value and masks."""
    if not isinstance(linear, CausalLinearAttention):
        return linear(*args, **kwargs)
    call = MHA_CALL.bind(None, *args, **kwargs).arguments
    mask = call.get("value_mask")
    mask = call.get("key_mask") if mask is None else mask
    return linear(call["query"], padding_mask=mask, training=call.get("training"))


def _batches(dataset) -> Iterator[Any]:
    """The `x` of each batch, iterating `dataset` again when it ends."""
    while True:
        empty = True
        for batch in dataset:
            empty = False
            yield batch[0] if isinstance(batch, tuple) else batch
        if empty:
            raise ValueError("`dataset` yielded no batch.")
        if iter(dataset) is dataset:  # a one-shot iterator: no second pass
            return
