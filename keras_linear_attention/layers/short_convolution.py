"""`ShortConvolution`: a causal depthwise convolution whose window is a state."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_linear_attention import _checks

PACKAGE = "keras_linear_attention"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ShortConvolution(keras.layers.Layer):
    """`y_t = silu(Σ_{j<K} w_j ⊙ x_{t−j})` per channel, over the real tokens.

    The short convolution that DeltaNet, Mamba and Based put on q, k and v
    before the recurrence. It is causal, so it is also an RNN whose state is
    the window: the last `K − 1` inputs. Padded tokens are skipped, not read
    as zeros: each real token's window holds the `K − 1` real tokens before
    it, and the returned window the last `K − 1` real tokens, so padding
    changes neither. The kernel starts as the identity (only `w_0 = 1`).

    Args:
        kernel_size: K ≥ 1.

    Call arguments:
        inputs: `(B, T, *channels)`.
        keep: Optional `(B, T)` mask, truthy for real tokens.
        window: Optional `(B, K − 1, *channels)` from a previous call (zeros
            by default).

    Returns:
        `(outputs (B, T, *channels), window (B, K − 1, *channels))`.

    Example:

    >>> conv = ShortConvolution(4)
    >>> y, window = conv(keras.ops.ones((2, 5, 3, 8)))
    >>> tuple(y.shape), tuple(window.shape)
    ((2, 5, 3, 8), (2, 3, 3, 8))
    """

    def __init__(self, kernel_size: int, **kwargs):
        super().__init__(**kwargs)
        _checks.check_positive_int("kernel_size", kernel_size)
        self.kernel_size = kernel_size

    def build(self, inputs_shape, keep_shape=None, window_shape=None):
        identity = lambda shape, dtype=None: ops.concatenate(
            [ops.zeros((shape[0] - 1, *shape[1:]), dtype), ops.ones((1, *shape[1:]), dtype)]
        )
        # kernel[K − 1] weighs the current token, kernel[0] the oldest.
        self.kernel = self.add_weight(
            name="kernel", shape=(self.kernel_size, *inputs_shape[2:]), initializer=identity
        )

    def initial_window(self, batch_size: Any, channels: tuple, dtype: str = "float32") -> Any:
        return ops.zeros((batch_size, self.kernel_size - 1, *channels), dtype)

    def call(self, inputs, keep=None, window=None):
        width = self.kernel_size - 1
        if window is None:
            window = self.initial_window(ops.shape(inputs)[0], inputs.shape[2:], inputs.dtype)
        window = ops.cast(window, inputs.dtype)
        order = None if keep is None else _real_tokens_first(keep)
        x = inputs if order is None else _gather_time(inputs, order)
        extended = ops.concatenate([window, x], axis=1)
        length = ops.shape(inputs)[1]
        kernel = ops.cast(self.kernel, inputs.dtype)
        out = sum(kernel[j] * extended[:, j : j + length] for j in range(self.kernel_size))
        out = ops.silu(out)
        if order is None:
            return out, extended[:, length:]
        real = ops.sum(ops.cast(keep, "int32"), axis=1)
        # The last `width` real tokens of `window + real tokens`.
        last = ops.expand_dims(real, 1) + ops.arange(width, dtype="int32")[None]
        new_window = _gather_time(extended, last)
        back = ops.cumsum(ops.cast(keep, "int32"), axis=1) - 1  # rank of each real token
        return _gather_time(out, ops.maximum(back, 0)), new_window

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


def _real_tokens_first(keep: Any) -> Any:
    """Per row, the positions of the real tokens in order, then the padded."""
    positions = ops.arange(ops.shape(keep)[1], dtype="int32")[None]
    key = ops.where(ops.cast(keep, "bool"), positions, positions + ops.shape(keep)[1])
    return ops.cast(ops.argsort(key, axis=1), "int32")


def _gather_time(x: Any, index: Any) -> Any:
    """`x[b, index[b, i]]` for `(B, T, ...)` x and `(B, I)` index."""
    index = ops.reshape(index, (*ops.shape(index), *([1] * (len(x.shape) - 2))))
    return ops.take_along_axis(x, index, axis=1)
