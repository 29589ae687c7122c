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


def check_step_inputs(*named: tuple) -> None:
    """`(name, tensor)` pairs of a one-token step: float tensors of shape
    `(batch, heads, dim)`."""
    for name, x in named:
        _checks.check_float(name, x)
        _checks.check_rank(name, x, 3, "(batch, heads, dim)")


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


def nonempty_validity(x: Any, name: str) -> Any:
    """Run-time check of a sequence length unknown until run time.

    Static zero lengths are refused by `check_qkv`; a dynamic one would
    otherwise give an all-zero output. Returns None (length known) or a
    1.0/NaN validity multiplier for the output (see
    `_checks.assert_at_runtime`).
    """
    if x.shape[1] is not None:
        return None
    return _checks.assert_at_runtime(
        ops.shape(x)[1] > 0,
        f"`{name}` has sequence length 0; attention needs at least one position.",
    )


def poison_on_failure(out: Any, validity: Any) -> Any:
    """`out`, or all NaN where a run-time check failed (`validity` is NaN)."""
    return out if validity is None else out * ops.cast(validity, out.dtype)


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


def scheduled_after(x: Any, *deps: Any) -> Any:
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


def check_state_shape(name: str, s: Any, expected: tuple) -> Any:
    """`s`, after checking a state's shape against `expected` = (batch,
    heads, feature_dim[, value_dim]): static where both sides are known, at
    run time (a graph assertion naming `name`) for the rest."""
    static = tuple(d if isinstance(d, int) else None for d in expected)
    layout = "batch, heads, " + ("feature_dim, value_dim" if len(expected) == 4 else "feature_dim")
    shown = ", ".join("B" if d is None else str(d) for d in static)
    message = f"`{name}` must have shape ({shown}) ({layout}; B as the inputs)"
    if len(s.shape) != len(expected) or not all(
        a is None or b is None or a == b for a, b in zip(s.shape, static, strict=True)
    ):
        raise ValueError(f"{message}; received {tuple(s.shape)}.")
    dynamic = [
        ops.equal(ops.shape(s)[i], d)
        for i, d in enumerate(expected)
        if d is not None and (s.shape[i] is None or not isinstance(d, int))
    ]
    if not dynamic:
        return s
    wanted = ops.stack([ops.cast(d, "int32") for d in expected])
    return _checks.checked(
        s, ops.stack(dynamic), f"{message}; received, then expected:", ops.shape(s), wanted
    )


def scan(step: Any, carry: Any, xs: list, ys_like: tuple) -> tuple:
    """`(carry, ys)` of `step(carry, [x[i] for x in xs]) -> (carry, ys_i)`
    over axis 0, `ys` a tuple stacked on axis 0 (`keras.ops.scan`).

    On TensorFlow a while loop with one TensorArray per output, shaped and
    typed like `ys_like` (Keras's TF `scan` wants outputs shaped like the
    carry); its gradient keeps one carry per step, here per chunk.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.scan(step, carry, xs)
    import tensorflow as tf

    n = tf.shape(xs[0])[0]
    arrays = tuple(tf.TensorArray(y.dtype, size=n, element_shape=y.shape) for y in ys_like)
    # Read through TensorArrays too: the gradient of `x[i]` in a loop is a
    # full-size zeros tensor per step (measured: 36x slower at 1024 steps).
    inputs = [tf.TensorArray(x.dtype, size=n, element_shape=x.shape[1:]).unstack(x) for x in xs]

    def body(i, carry, arrays):
        carry, ys = step(carry, [x.read(i) for x in inputs])
        return i + 1, carry, tuple(a.write(i, y) for a, y in zip(arrays, ys, strict=True))

    # A bound on the iterations: XLA's gradient of the loop needs it.
    _, carry, arrays = tf.while_loop(
        lambda i, *_: i < n, body, (0, carry, arrays), maximum_iterations=n
    )
    return carry, tuple(a.stack() for a in arrays)
