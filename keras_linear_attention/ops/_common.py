"""Helpers shared by the attention math: dtypes, masks, shape checks."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_linear_attention import _checks

DEFAULT_EPS = 1e-6


def accumulation_dtype(*tensors: Any) -> str:
    """float64 if any input is float64, else float32 (never float16)."""
    if any(_checks.dtype_name(t) == "float64" for t in tensors):
        return "float64"
    return "float32"


def check_qkv(q: Any, k: Any, value: Any, names: tuple = ("phi_q", "phi_k", "value")) -> None:
    """Validate (B, T, H, D), (B, S, H, D), (B, S, H, M) inputs."""
    nq, nk, nv = names
    for name, x, layout in (
        (nq, q, "(batch, target_len, heads, feature_dim)"),
        (nk, k, "(batch, source_len, heads, feature_dim)"),
        (nv, value, "(batch, source_len, heads, value_dim)"),
    ):
        _checks.check_float(name, x)
        _checks.check_rank(name, x, 4, layout)
        _checks.check_nonempty(name, x)
    _checks.check_dim(f"{nk} length", k.shape[1], f"{nv} length", value.shape[1])
    _checks.check_dim(f"{nq} heads", q.shape[2], f"{nk} heads", k.shape[2])
    _checks.check_dim(f"{nk} heads", k.shape[2], f"{nv} heads", value.shape[2])
    _checks.check_dim(f"{nq} feature dim", q.shape[3], f"{nk} feature dim", k.shape[3])


def nonempty_factor(x: Any, name: str) -> Any:
    """Runtime guard for a sequence length unknown until run time.

    Static zero lengths are refused by `check_qkv`; a dynamic one would
    otherwise give an all-zero output. Returns None (length known) or a
    1.0/NaN factor for the output (see `_checks.assert_at_runtime`).
    """
    if x.shape[1] is not None:
        return None
    return _checks.assert_at_runtime(
        ops.shape(x)[1] > 0,
        f"`{name}` has sequence length 0; attention needs at least one position.",
    )


def guard(out: Any, factor: Any) -> Any:
    return out if factor is None else out * ops.cast(factor, out.dtype)


def mask_keys(phi_k: Any, value: Any, key_mask: Any) -> tuple:
    """Zero φ(k_j) and v_j of padded keys: removes them from both S and z.

    `where`, not a product: a NaN or inf in a padded position (pipelines pad
    with anything) must not leak into the unpadded outputs through 0·NaN.
    """
    if key_mask is None:
        return phi_k, value
    check_key_mask(key_mask, phi_k.shape[1])
    keep = ops.expand_dims(ops.cast(key_mask, "bool"), (2, 3))
    return ops.where(keep, phi_k, 0), None if value is None else ops.where(keep, value, 0)


def check_key_mask(key_mask: Any, length: Any, keys: str = "phi_k") -> None:
    if len(key_mask.shape) != 2:
        raise ValueError(
            "`key_mask` must have shape (batch, source_len); received shape "
            f"{tuple(key_mask.shape)}."
        )
    _checks.check_dim("key_mask length", key_mask.shape[1], f"{keys} length", length)


def normalize(numerator: Any, denominator: Any, eps: float) -> Any:
    """`numerator / (denominator + eps)`, with 0 where that sum is exactly 0.

    A query whose features are orthogonal to every key feature (relu maps
    with all-negative inputs, every key padded) has numerator 0 and, with
    `eps=0`, denominator 0: the documented fallback output is 0, not NaN.
    `denominator` has a trailing axis of 1 and broadcasts over values.
    """
    denominator, _ = safe_denominator(denominator, eps)
    return numerator / denominator


def safe_denominator(denominator: Any, eps: float) -> tuple:
    """`denominator + eps`, with an exact 0 replaced by 1 (see `normalize`);
    also the mask of those zeros, which hand-written gradients need."""
    denominator = denominator + eps
    zero = ops.equal(denominator, 0)
    return ops.where(zero, ops.ones_like(denominator), denominator), zero


def denominator_gradient(g_out: Any, out: Any, denominator: Any, zero: Any, layout) -> Any:
    """Gradient of `out = numerator / denominator` with respect to the
    denominator: `-Σ_values g_out·out / denominator`, 0 where it was replaced.

    The sum runs in `out`'s layout, so only its `(..., 1)` result goes
    through `layout` into the denominator's layout.
    """
    g_den = layout(ops.sum(g_out * out, axis=-1, keepdims=True)) / denominator
    return ops.where(zero, ops.zeros_like(g_den), -g_den)


def after(x: Any, *deps: Any) -> Any:
    """`x`, for ops that must not start before `deps` exist (TensorFlow).

    TF's graph executor runs every op whose inputs are ready. In a gradient
    function, anything computed from forward tensors alone (a recomputed
    matrix, a transposed copy) is ready during the forward pass, so it runs
    there and stays in memory until the backward pass uses it: recomputation
    turns into storage. A control edge on the upstream gradient keeps such
    ops where they are used, and a chain of them bounds how many backward
    temporaries are alive at once. XLA and the other backends schedule for
    memory themselves (or run eagerly): `x` unchanged.
    """
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf

    with tf.control_dependencies([d for d in deps if d is not None]):
        return tf.identity(x)


def cast_all(dtype: str, *tensors: Any) -> list:
    return [ops.cast(t, dtype) for t in tensors]
