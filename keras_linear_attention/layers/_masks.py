"""Reduce Keras-style masks to the key-padding mask linear attention supports."""

from __future__ import annotations

from typing import Any

from keras import ops

from keras_linear_attention import _checks

UNSUPPORTED = (
    "Linear attention supports key-padding and causal masking only: "
    "`attention_mask` must have shape (B, S), (B, 1, S) or (B, T, S) with "
    "identical rows{causal}. For a causal mask pass `use_causal_mask=True`."
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
    attention_mask: Any, query_len: Any, key_len: Any, causal: bool
) -> tuple:
    """Return `(key_mask (B, S), nan_or_one)` from a (B, S)/(B, 1, S)/(B, T, S) mask.

    A (B, T, S) mask is accepted when its rows are identical (or, with
    `causal`, identical on and below the diagonal, i.e. padding & causal).
    The check runs at runtime; the returned factor is NaN if it failed under
    XLA (where assertions are dropped), so a wrong mask is never silent.
    """
    mask = ops.cast(ops.convert_to_tensor(attention_mask), "bool")
    rank = len(mask.shape)
    hint = " (on and below the diagonal)" if causal else ""
    if rank not in (2, 3) or not _static_match(mask.shape[-1], key_len):
        raise ValueError(
            UNSUPPORTED.format(causal=hint)
            + f" Received attention_mask of shape {tuple(mask.shape)} for "
            f"{key_len} keys."
        )
    if rank == 2:
        return mask, None
    if mask.shape[1] == 1:
        return mask[:, 0], None
    if not _static_match(mask.shape[1], query_len):
        raise ValueError(
            UNSUPPORTED.format(causal=hint)
            + f" Received attention_mask of shape {tuple(mask.shape)} for "
            f"{query_len} queries and {key_len} keys."
        )
    if causal:
        row = mask[:, -1]
        lower = ops.cast(ops.tril(ops.ones((ops.shape(mask)[1], ops.shape(mask)[2]))), "bool")
        same = ops.equal(
            ops.logical_and(mask, lower), ops.logical_and(ops.expand_dims(row, 1), lower)
        )
    else:
        row = mask[:, 0]
        same = ops.equal(mask, ops.expand_dims(row, 1))
    factor = _checks.assert_at_runtime(
        same,
        UNSUPPORTED.format(causal=hint) + " This (B, T, S) mask has rows that differ.",
    )
    return row, factor


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
