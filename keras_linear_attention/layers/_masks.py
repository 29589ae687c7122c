"""Reduce Keras-style masks to what linear attention computes exactly.

Linear attention sums over keys (causal: over a prefix of them), so a mask
it can honour exactly is, per batch row, `rows[i] & keys[j]` (query padding
times key padding), optionally `& (j <= i)` (causal). Every Keras form of
those (`attention_mask` of rank 2, 3 or 4, `use_causal_mask`, the inputs'
Keras masks, `value_mask`/`key_mask`) is reduced here to a `Plan`; any other
pattern raises.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import keras
from keras import ops

from keras_linear_attention import _checks

UNSUPPORTED = (
    "Linear attention supports key-padding and causal masking only, and their "
    "products with query padding: `attention_mask` (read as Keras reads it: "
    "(T, S), (B, T, S) or (B, heads, T, S), any of B, heads and T possibly 1) "
    "must be the same for every head and equal `rows[b, i] and keys[b, j]`"
    "{causal} (an all-False row is a fully masked query). For a causal mask "
    "pass `use_causal_mask=True`; for per-batch key padding, `value_mask` (B, S)."
)
CAUSAL_HINT = " on and below the diagonal (j <= i: Keras's top-left `tril`, also for T != S)"
EITHER_HINT = ", or that `and j <= i` (causal: Keras's top-left `tril`, also for T != S)"


class Plan(NamedTuple):
    """What linear attention computes for the masks of one call.

    keys: `(B, S)` bool or None: the keys a query may see (if `causal`,
        only those with j <= i).
    rows: `(B, T)` bool or None: False for a padded query (a fully masked
        row, as is any row that sees no key; see `visible_rows`).
    causal: Python bool, or a scalar bool tensor where a dense mask whose
        values are known only at run time decides it (the layer then builds
        both paths under a `cond`, and one runs).
    validity: None, or a 1.0/NaN multiplier for the output (a failed run-time
        check under XLA, see `_checks.assert_at_runtime`).
    """

    keys: Any
    rows: Any
    causal: Any
    validity: Any


def plan(
    query: Any,
    value: Any,
    num_heads: int,
    attention_mask: Any = None,
    query_mask: Any = None,
    value_mask: Any = None,
    key_mask: Any = None,
    causal: bool = False,
) -> Plan:
    """Reduce the masks of one call to a `Plan`, or raise.

    `query_mask` (B, T), `value_mask` and `key_mask` (B, S) are Keras's
    per-position masks (explicit or implicit); `attention_mask` any dense
    mask Keras accepts. As in Keras, the effective mask is their product
    (and `tril` of T×S with `causal`).
    """
    batch_pos = lambda x: tuple(x.shape[:-1])
    keys = combine(
        flatten_mask("value_mask", value_mask, batch_pos(value)),
        flatten_mask("key_mask", key_mask, batch_pos(value)),
    )
    rows = flatten_mask("query_mask", query_mask, batch_pos(query))
    validity = None
    if attention_mask is not None:
        r, c, causal, validity = from_attention_mask(
            attention_mask, query, value, num_heads, causal
        )
        keys, rows = combine(keys, c), combine(rows, r)
    return Plan(keys, rows, causal, validity)


def from_attention_mask(
    attention_mask: Any, query: Any, value: Any, num_heads: int, causal: bool
) -> tuple:
    """Return `(rows (B, T) or None, keys (B, S), causal, validity)`.

    The mask is read as `keras.layers.MultiHeadAttention` reads it: leading
    axes are added until it is `(B, heads, *T_axes, *S_axes)`, so a rank-2
    mask is `(T, S)` shared by every batch row. It is accepted when its
    batch is 1 or B, its heads 1 or `num_heads` (all alike), and, in every
    batch row, it equals `rows[i] & keys[j]` (query padding times key
    padding), or that `& (j <= i)` (causal, top-left aligned like Keras's
    `tril` of T×S). With `causal` it is first ANDed with `tril`, as Keras
    does, and only the second form is possible.

    The shape cannot tell these apart, so the values decide, at the cost
    of a few O(B·T·S) boolean passes over the mask (only when a dense mask
    with a query axis is given). Values known when the layer is called
    (NumPy, eager or constant tensors, also inside `tf.function`) are read
    then: a wrong mask raises `ValueError` at once and the causal choice is
    static. Otherwise the checks run in the graph (an assertion; under XLA,
    which drops assertions, a NaN multiplier) and `causal` is a scalar tensor.
    """
    mask = ops.convert_to_tensor(attention_mask)
    hint = CAUSAL_HINT if causal else EITHER_HINT
    t_pos, s_pos = tuple(ops.shape(query)[1:-1]), tuple(ops.shape(value)[1:-1])
    shapes = (tuple(query.shape[1:-1]), tuple(value.shape[1:-1]), t_pos, s_pos)
    static = _static_value(mask)
    if static is not None and all(isinstance(d, int) for d in t_pos + s_pos):
        with _eagerly():  # values known: read them now
            mask = ops.cast(ops.convert_to_tensor(static), "bool")
            mask = _as_batch_heads_rows_keys(mask, *shapes, hint)
            r, c, causal, conditions, messages = _decompose(mask, num_heads, causal, hint)
            _assert_all(conditions, messages, hint)  # raises here if false
        conditions, messages = [], []
        causal = bool(causal) if _checks.is_concrete(causal) else causal
    else:
        mask = _as_batch_heads_rows_keys(ops.cast(mask, "bool"), *shapes, hint)
        r, c, causal, conditions, messages = _decompose(mask, num_heads, causal, hint)
    _check_axis(mask, 0, "batch", ops.shape(query)[0], conditions, messages, hint)
    validity = _assert_all(conditions, messages, hint)
    # Row b of the mask for batch row b, or row 0 for all: a gather that
    # cannot fail, so a bad batch reaches the assertion, not a shape error.
    picks = ops.minimum(ops.arange(ops.shape(query)[0]), ops.shape(c)[0] - 1)
    r = None if r is None else ops.take(r, picks, axis=0)
    return r, ops.take(c, picks, axis=0), causal, validity


def _decompose(mask: Any, num_heads: int, causal: bool, hint: str) -> tuple:
    """`(B', H', T or 1, S)` -> `(rows, keys, causal, conditions, messages)`."""
    conditions, messages = [], []
    _check_axis(mask, 1, "heads", num_heads, conditions, messages, hint)
    if mask.shape[1] != 1:
        conditions.append(ops.equal(mask, mask[:, :1]))
        messages.append("its heads differ")
    mask = mask[:, 0]
    if mask.shape[1] == 1:  # one row for every query: key padding
        return None, mask[:, 0], causal, conditions, messages
    lower = ops.cast(ops.tril(ops.ones((ops.shape(mask)[1], ops.shape(mask)[2]))), "bool")
    if causal:
        mask = ops.logical_and(mask, lower)
    rows, keys = ops.any(mask, axis=2), ops.any(mask, axis=1)
    outer = ops.logical_and(ops.expand_dims(rows, 2), ops.expand_dims(keys, 1))
    is_causal = ops.all(ops.equal(mask, ops.logical_and(outer, lower)))
    if causal:
        conditions.append(is_causal)
        messages.append("its rows on and below the diagonal are not query times key padding")
        return rows, keys, True, conditions, messages
    plain = ops.all(ops.equal(mask, outer))
    conditions.append(ops.logical_or(plain, is_causal))
    messages.append("it is not query padding times key padding (times `tril`)")
    return rows, keys, ops.logical_and(is_causal, ops.logical_not(plain)), conditions, messages


def _assert_all(conditions: list, messages: list, hint: str) -> Any:
    validity = None
    for condition, what in zip(conditions, messages, strict=True):
        more = _checks.assert_at_runtime(
            condition, UNSUPPORTED.format(causal=hint) + f" This attention_mask: {what}."
        )
        validity = more if validity is None else validity * more
    return validity


def _static_value(x: Any) -> Any:
    """`x` as NumPy if its values are known now (eager, or a TensorFlow
    graph constant), else None."""
    if keras.backend.backend() != "tensorflow":
        return ops.convert_to_numpy(x) if _checks.is_concrete(x) else None
    import tensorflow as tf

    if not isinstance(x, tf.Tensor):
        return None
    if _checks.is_concrete(x):
        return x.numpy()
    return tf.get_static_value(x)


def _eagerly() -> Any:
    """Run ops eagerly, also while a TensorFlow graph is being traced."""
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.init_scope()


def visible_rows(plan: Plan, t: Any, s: Any) -> Any:
    """`(B, T)` bool: the queries that see at least one key, or None (all).

    A row that sees none (query padding, every key padded, or, causal, the
    keys up to it padded) is fully masked; the layer gives it Keras's value.
    Causal is top-left aligned: query i sees keys j <= min(i, S - 1).
    O(B·(T + S)).
    """
    keys, rows, causal = plan.keys, plan.rows, plan.causal
    sees = None
    if keys is not None:
        sees = ops.any(keys, axis=1, keepdims=True)
        if causal is not False:
            seen = ops.cumsum(ops.cast(keys, "int32"), axis=1) > 0
            seen = ops.take(seen, ops.minimum(ops.arange(t), s - 1), axis=1)
            sees = seen if causal is True else ops.where(causal, seen, sees)
        sees = ops.broadcast_to(sees, (ops.shape(keys)[0], t))
    if rows is None:
        return sees
    return rows if sees is None else ops.logical_and(rows, sees)


def align_causal_keys(k: Any, v: Any, keys: Any, t: Any) -> tuple:
    """Keys of a top-left causal T×S mask (query i sees keys j <= i), laid
    out for the T == S causal algorithm: the first T keys (S > T: no query
    sees the later ones), or all S and then T - S masked copies (T > S:
    queries i >= S see every key). A gather, so run-time lengths work."""
    s = k.shape[1] if k.shape[1] is not None else ops.shape(k)[1]
    if isinstance(t, int) and isinstance(s, int) and t == s:
        return k, v, keys
    index = ops.arange(t)
    picks = ops.minimum(index, s - 1)
    valid = ops.expand_dims(index < s, 0)
    keys = valid if keys is None else ops.logical_and(ops.take(keys, picks, axis=1), valid)
    keys = ops.broadcast_to(keys, (ops.shape(k)[0], t))
    return ops.take(k, picks, axis=1), ops.take(v, picks, axis=1), keys


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


def _as_batch_heads_rows_keys(
    mask: Any, t_axes: tuple, s_axes: tuple, t_pos: tuple, s_pos: tuple, hint: str
) -> Any:
    """Keras's layout `(B', H', *T_axes, *S_axes)` -> `(B', H', T or 1, S)`.

    `t_axes`/`s_axes`: the static query/key positions (None if unknown);
    `t_pos`/`s_pos`: the same at run time (ints or scalar tensors).
    """
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
        mask = _checks.checked(
            mask,
            ops.stack(
                [ops.equal(a, b) | ops.equal(a, 1) for a, b in zip(t_shape, t_pos, strict=True)]
            ),
            UNSUPPORTED.format(causal=hint) + " Its query axes do not match the query.",
        )
        mask = ops.broadcast_to(mask, (*ops.shape(mask)[:2], *t_pos, *s_pos))
    return ops.reshape(mask, (*ops.shape(mask)[:2], rows or -1, _size(s_pos)))


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
