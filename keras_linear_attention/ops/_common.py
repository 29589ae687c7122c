"""Helpers shared by the attention math: dtypes, masks, shape checks."""

from __future__ import annotations

from typing import Any

from keras import ops

from keras_linear_attention import _checks

DEFAULT_EPS = 1e-6


def accumulation_dtype(*tensors: Any) -> str:
    """float64 if any input is float64, else float32 (never float16)."""
    if any(_checks.dtype_name(t) == "float64" for t in tensors):
        return "float64"
    return "float32"


def check_qkv(phi_q: Any, phi_k: Any, value: Any) -> None:
    """Validate (B, T, H, D), (B, S, H, D), (B, S, H, M) inputs."""
    for name, x, layout in (
        ("phi_q", phi_q, "(batch, target_len, heads, feature_dim)"),
        ("phi_k", phi_k, "(batch, source_len, heads, feature_dim)"),
        ("value", value, "(batch, source_len, heads, value_dim)"),
    ):
        _checks.check_float(name, x)
        _checks.check_rank(name, x, 4, layout)
        _checks.check_nonempty(name, x)
    _checks.check_dim("phi_k length", phi_k.shape[1], "value length", value.shape[1])
    _checks.check_dim("phi_q heads", phi_q.shape[2], "phi_k heads", phi_k.shape[2])
    _checks.check_dim("phi_k heads", phi_k.shape[2], "value heads", value.shape[2])
    _checks.check_dim("phi_q feature dim", phi_q.shape[3], "phi_k feature dim", phi_k.shape[3])


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


def mask_keys(phi_k: Any, key_mask: Any) -> Any:
    """Zero φ(k_j) of padded keys: removes them from both S and z."""
    if key_mask is None:
        return phi_k
    if len(key_mask.shape) != 2:
        raise ValueError(
            "`key_mask` must have shape (batch, source_len); received shape "
            f"{tuple(key_mask.shape)}."
        )
    _checks.check_dim("key_mask length", key_mask.shape[1], "phi_k length", phi_k.shape[1])
    mask = ops.cast(ops.cast(key_mask, "bool"), phi_k.dtype)
    return phi_k * ops.expand_dims(mask, (2, 3))


def cast_all(dtype: str, *tensors: Any) -> list:
    return [ops.cast(t, dtype) for t in tensors]
