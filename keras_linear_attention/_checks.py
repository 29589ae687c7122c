"""Input validation shared by the math and the layers.

Every check raises an error that names the argument and says what was
expected, so bad input never reaches TensorFlow as an obscure shape error.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
from keras import ops


def dtype_name(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def check_float(name: str, x: Any) -> None:
    dtype = dtype_name(x)
    if "float" not in dtype:
        raise TypeError(
            f"`{name}` must be a floating-point tensor; received dtype "
            f"{dtype}. Cast it first, e.g. `keras.ops.cast({name}, 'float32')`."
        )


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    if len(x.shape) != rank:
        raise ValueError(
            f"`{name}` must have rank {rank} with layout {layout}; received shape {tuple(x.shape)}."
        )


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {expected}; received {value!r}.")


def check_dim(name: str, size: Any, other_name: str, other_size: Any) -> None:
    """Raise if two static sizes are known and differ."""
    if size is not None and other_size is not None and size != other_size:
        raise ValueError(f"{name} ({size}) must equal {other_name} ({other_size}).")


def check_nonempty(name: str, x: Any, axis: int = 1) -> None:
    size = x.shape[axis]
    if size is not None and size == 0:
        raise ValueError(
            f"`{name}` has sequence length 0 (shape {tuple(x.shape)}); "
            "attention needs at least one position."
        )


def is_concrete(x: Any) -> bool:
    """True when `x` holds values now (eager), False inside a traced graph."""
    try:
        import tensorflow as tf

        if isinstance(x, tf.Tensor):
            return tf.executing_eagerly() and hasattr(x, "numpy")
    except ImportError:  # pragma: no cover - TF is a hard dependency today
        pass
    try:
        bool(ops.all(x))
        return True
    except Exception:  # tracer of another backend
        return False


def assert_at_runtime(condition: Any, message: str) -> Any:
    """Check a data-dependent `condition` wherever the backend allows it.

    Eager: raises `ValueError(message)` at once. TensorFlow graph: adds an
    assertion op. Returns a float 1.0/NaN validity multiplier that the caller multiplies
    into its output, so a violated condition is never silent under XLA,
    which drops assertion ops.
    """
    _assert(condition, message)
    return ops.where(ops.all(condition), 1.0, float("nan"))


def checked(x: Any, condition: Any, message: str, *data: Any) -> Any:
    """`x`, once a data-dependent `condition` holds (see `assert_at_runtime`).

    In a TensorFlow graph `x` depends on the assertion, so it fails with
    `message` before any op that would fail on `x` with a shape error of
    its own; under XLA, which drops assertions, a float `x` is NaN instead
    (for other dtypes the caller keeps the 1.0/NaN multiplier). `data` (tensors) are
    printed after `message` when the assertion fails.
    """
    assertion = _assert(condition, message, *data)
    if is_concrete(condition):
        return x
    if assertion is not None:
        import tensorflow as tf

        with tf.control_dependencies([assertion]):
            x = tf.identity(x)
    if "float" not in dtype_name(x):
        return x
    return x * ops.cast(ops.where(ops.all(condition), 1.0, float("nan")), x.dtype)


def _assert(condition: Any, message: str, *data: Any) -> Any:
    """Raise `ValueError(message)` now if `condition` is concrete and false;
    in a TensorFlow graph, return the assertion op (`data` printed after
    `message`); else None."""
    if is_concrete(condition):
        if not bool(ops.all(condition)):
            raise ValueError(message)
        return None
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.debugging.Assert(ops.all(condition), [message, *data])


def check_int(
    name: str, value: Any, low: int, high: int | None = None, allow_none: bool = False
) -> None:
    """Raise unless `value` is an integer in `[low, high)` (or None if allowed).

    NumPy integers count (they come out of arrays); bools do not.
    """
    if value is None and allow_none:
        return
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value >= high):
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        none = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer {span}{none}; received {value!r}.")
