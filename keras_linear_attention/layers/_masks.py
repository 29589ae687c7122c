"""Reduce Keras-style masks to the key-padding mask linear attention supports."""

from __future__ import annotations

import math
from typing import Any

from keras import ops

from keras_linear_attention import _checks

UNSUPPORTED = (
    "Linear attention supports key-padding and causal masking only: "
    "`attention_mask` (read as Keras reads it: (T, S), (B, T, S) or "
    "(B, heads, T, S), any of B, heads and T possibly 1) must have identical "
    "query rows{causal}. For a causal mask pass `use_causal_mask=True`; for "
    "per-batch key padding, `value_mask` (B, S)."
)


def _flatten(mask: Any) -> Any:
    """(B, *spatial) -> (B, prod(spatial)) as bool."""
    mask = ops.cast(mask, "bool")
    if len(mask.shape) == 2:
        return mask
    return ops.reshape(mask, (ops.shape(mask)[0], -1))


def combine(*masks: Any) -> Any:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = ops.logical_and(out, m)
    return out


def key_padding_from_attention_mask(
    attention_mask: Any, query: Any, value: Any, num_heads: int, causal: bool
) -> tuple:
    """Return `(key_mask (B, S), factor)` from an `attention_mask`.

    The mask is read as `keras.layers.MultiHeadAttention` reads it: leading
    axes are added until it is `(B, heads, *T_axes, *S_axes)`, so a rank-2
    mask is `(T, S)` shared by every batch row. It is accepted when its batch
    is 1 or B, its heads 1 or `num_heads` (all alike), and its query rows
    are identical (with `causal`: identical on and below the diagonal, i.e.
    padding & causal). Checks that need values run at run time; the returned
    factor is NaN if one failed under XLA (which drops assertions), so a
    wrong mask is never silent.
    """
    mask = ops.cast(ops.convert_to_tensor(attention_mask), "bool")
    hint = " (on and below the diagonal)" if causal else ""
    mask = _as_batch_heads_rows_keys(mask, query, value, hint)
    _, heads, rows, _ = mask.shape
    conditions, messages = [], []
    _check_axis(mask, 0, "batch", ops.shape(query)[0], conditions, messages, hint)
    _check_axis(mask, 1, "heads", num_heads, conditions, messages, hint)
    if heads != 1:
        conditions.append(ops.equal(mask, mask[:, :1]))
        messages.append("its heads differ")
    mask = mask[:, 0]
    if rows != 1:
        conditions.append(_rows_agree(mask, causal))
        messages.append("its query rows differ")
    row = mask[:, -1] if causal else mask[:, 0]
    # Row b of the mask for batch row b, or row 0 for all: a gather that
    # cannot fail, so a bad batch reaches the assertion, not a shape error.
    picks = ops.minimum(ops.arange(ops.shape(query)[0]), ops.shape(row)[0] - 1)
    row = ops.take(row, picks, axis=0)
    factor = None
    for condition, what in zip(conditions, messages, strict=True):
        more = _checks.assert_at_runtime(
            condition, UNSUPPORTED.format(causal=hint) + f" This attention_mask: {what}."
        )
        factor = more if factor is None else factor * more
    return row, factor


def _as_batch_heads_rows_keys(mask: Any, query: Any, value: Any, hint: str) -> Any:
    """Keras's layout `(B', H', *T_axes, *S_axes)` -> `(B', H', T or 1, S)`."""
    t_axes, s_axes = tuple(query.shape[1:-1]), tuple(value.shape[1:-1])
    rank = len(mask.shape)
    want = 2 + len(t_axes) + len(s_axes)
    fits = want - 2 <= rank <= want and _static_match_all(mask.shape[rank - len(s_axes) :], s_axes)
    t_dims = mask.shape[rank - len(s_axes) - len(t_axes) : rank - len(s_axes)]
    fits = fits and all(
        a in (1, None) or _static_match(a, b) for a, b in zip(t_dims, t_axes, strict=True)
    )
    if not fits:
        raise ValueError(
            UNSUPPORTED.format(causal=hint)
            + f" Received attention_mask of shape {tuple(mask.shape)} for query "
            f"positions {t_axes} and key positions {s_axes}."
        )
    for _ in range(want - rank):
        mask = ops.expand_dims(mask, 0 if len(mask.shape) < want - 1 else 1)
    t_shape = tuple(ops.shape(mask)[2 : 2 + len(t_axes)])
    rows = 1 if all(d == 1 for d in mask.shape[2 : 2 + len(t_axes)]) else None
    if rows is None:
        positions = tuple(ops.shape(query)[1:-1])
        mask = _checks.checked(
            mask,
            ops.stack(
                [ops.equal(a, b) | ops.equal(a, 1) for a, b in zip(t_shape, positions, strict=True)]
            ),
            UNSUPPORTED.format(causal=hint) + " Its query axes do not match the query.",
        )
        mask = ops.broadcast_to(mask, (*ops.shape(mask)[:2], *positions, *ops.shape(value)[1:-1]))
    keys = _size(ops.shape(value)[1:-1])
    return ops.reshape(mask, (*ops.shape(mask)[:2], rows or -1, keys))


def _check_axis(mask, axis, name, size, conditions, messages, hint) -> None:
    """The mask's `axis` must be 1 or `size`: statically, or at run time."""
    dim = mask.shape[axis]
    if dim == 1:
        return
    if dim is not None and isinstance(size, int):
        if dim != size:
            raise ValueError(
                UNSUPPORTED.format(causal=hint)
                + f" Received attention_mask with {dim} along its {name} axis, "
                f"for {size} {name}: expected 1 or {size}."
            )
        return
    dim = ops.shape(mask)[axis]
    conditions.append(ops.logical_or(ops.equal(dim, size), ops.equal(dim, 1)))
    messages.append(f"its {name} axis is neither 1 nor the inputs' {name}")


def _rows_agree(mask: Any, causal: bool) -> Any:
    """Rows of `(B, T, S)` equal (causal: on and below the diagonal)."""
    if not causal:
        return ops.equal(mask, mask[:, :1])
    lower = ops.cast(ops.tril(ops.ones((ops.shape(mask)[1], ops.shape(mask)[2]))), "bool")
    return ops.equal(ops.logical_and(mask, lower), ops.logical_and(mask[:, -1:], lower))


def _size(dims: tuple) -> Any:
    """Product of static ints and/or scalar tensors."""
    return math.prod(dims) if all(isinstance(d, int) for d in dims) else ops.prod(ops.stack(dims))


def _static_match_all(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(
        _static_match(a, b) for a, b in zip(shape, expected, strict=True)
    )


def _static_match(a: Any, b: Any) -> bool:
    return a is None or b is None or a == b


def flatten_mask(name: str, mask: Any, expected_shape: tuple) -> Any:
    """Check a per-position mask against `(B, *spatial)` and flatten it."""
    if mask is None:
        return None
    mask = ops.convert_to_tensor(mask)
    ok = len(mask.shape) == len(expected_shape) and all(
        _static_match(a, b) for a, b in zip(mask.shape, expected_shape, strict=True)
    )
    if not ok:
        raise ValueError(
            f"`{name}` must have shape {tuple(expected_shape)} (batch and "
            f"sequence axes of its input); received {tuple(mask.shape)}."
        )
    return _flatten(mask)
