"""Independent, obviously-correct reference: the explicit T×S kernel matrix.

Written with plain TensorFlow ops in float64 (so it can be differentiated),
sharing no code with the package: feature maps are re-implemented here. The
last section has the same formulas in `keras.ops`, for the checks that must
differentiate the reference on every Keras backend (`test_backends.py`).
"""

import numpy as np
import tensorflow as tf
from keras import ops

EPS = 1e-6


def elu_plus_one(x):
    return tf.where(x > 0, x + 1.0, tf.exp(tf.minimum(x, 0.0)))


def relu(x):
    return tf.maximum(x, tf.zeros_like(x))


def favor(x, projection):
    """Performer's positive random features, from the formula."""
    d = x.shape[-1]
    x = x / d**0.25
    proj = tf.einsum("...d,dm->...m", x, tf.cast(projection, x.dtype))
    return tf.exp(proj - 0.5 * tf.reduce_sum(x * x, -1, keepdims=True)) / np.sqrt(
        projection.shape[-1]
    )


def kernel_attention(phi_q, phi_k, v, key_mask=None, causal=False, eps=EPS):
    """(B,T,H,D), (B,S,H,D), (B,S,H,M) -> (B,T,H,M) via the explicit matrix."""
    phi_q, phi_k, v = (tf.cast(t, tf.float64) for t in (phi_q, phi_k, v))
    a = tf.einsum("bthd,bshd->bhts", phi_q, phi_k)
    t, s = a.shape[2], a.shape[3]
    if key_mask is not None:
        a = a * tf.cast(key_mask, tf.float64)[:, None, None, :]
    if causal:
        a = a * np.tril(np.ones((t, s)))
    a = a / (tf.reduce_sum(a, -1, keepdims=True) + eps)
    return tf.einsum("bhts,bshm->bthm", a, v)


def causal_attention_with_state(phi_q, phi_k, v, initial_kv, initial_k_sum, key_mask=None, eps=EPS):
    """Causal kernel attention seeded with a state `(initial_kv, initial_k_sum)` as if it
    summed earlier keys; returns `(out, (kv, k_sum))`, the final state being
    the plain masked sums. Explicit T×T matrix, float64."""
    phi_q, phi_k, v, initial_kv, initial_k_sum = (
        tf.cast(t, tf.float64) for t in (phi_q, phi_k, v, initial_kv, initial_k_sum)
    )
    if key_mask is not None:
        keep = tf.cast(key_mask, tf.float64)[:, :, None, None]
        phi_k, v = phi_k * keep, v * keep
    n = phi_q.shape[1]
    a = tf.einsum("bthd,bshd->bhts", phi_q, phi_k) * np.tril(np.ones((n, n)))
    numerator = tf.einsum("bhts,bshm->bthm", a, v) + tf.einsum("bthd,bhdm->bthm", phi_q, initial_kv)
    denominator = tf.reduce_sum(a, -1) + tf.einsum("bthd,bhd->bht", phi_q, initial_k_sum)
    out = numerator / (tf.transpose(denominator, (0, 2, 1))[..., None] + eps)
    kv = initial_kv + tf.einsum("bshd,bshm->bhdm", phi_k, v)
    return out, (kv, initial_k_sum + tf.reduce_sum(phi_k, 1))


def layer_weights(layer, dtype=tf.float64):
    """The layer's weights by sublayer path, e.g. {"query/kernel": ...}."""
    prefix = f"{layer.name}/"  # the layer may sit inside another
    return {v.path.split(prefix, 1)[1]: tf.constant(v.numpy(), dtype) for v in layer.weights}


def layer_reference(w, query, value, key=None, phi=elu_plus_one, gate=False, **kwargs):
    """A (Linear)MultiHeadAttention forward pass from its weights `w`.

    Inputs are (B, T, dim) / (B, S, dim); `kwargs` go to `kernel_attention`.
    """
    key = value if key is None else key
    query, key, value = (tf.cast(x, tf.float64) for x in (query, key, value))

    def proj(x, name):
        return tf.einsum("btd,dhk->bthk", x, w[f"{name}/kernel"]) + w[f"{name}/bias"]

    out = kernel_attention(
        phi(proj(query, "query")), phi(proj(key, "key")), proj(value, "value"), **kwargs
    )
    if gate:
        out = out * tf.sigmoid(proj(query, "gate"))
    return (
        tf.einsum("bthk,hkd->btd", out, w["attention_output/kernel"]) + w["attention_output/bias"]
    )


# Gated linear attention and the (gated) delta rule, token by token.
# S (B, H, D, M); o_t = S_tᵀ q_t. Literal loops over t, float64.


def gated_recurrence(q, k, v, log_gate, s0=None):
    """S_t = exp(g_t) S_{t-1} + k_t v_tᵀ; returns (o (B,T,H,M), S_final)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    g = np.broadcast_to(np.asarray(log_gate, np.float64), (b, t, h))  # (H,) -> (B, T, H)
    s = np.zeros((b, h, d, v.shape[-1])) if s0 is None else np.array(s0, np.float64)
    o = np.zeros(v.shape)
    for i in range(t):
        kv = np.einsum("bhd,bhm->bhdm", k[:, i], v[:, i])
        s = np.exp(g[:, i])[..., None, None] * s + kv
        o[:, i] = np.einsum("bhdm,bhd->bhm", s, q[:, i])
    return o, s


def delta_recurrence(q, k, v, beta, log_gate=None, s0=None):
    """S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ (g_t = 0 without
    `log_gate`); returns (o (B,T,H,M), S_final)."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    b, t, h, d = q.shape
    g = np.zeros((b, t, h)) if log_gate is None else np.asarray(log_gate, np.float64)
    g = np.broadcast_to(g, (b, t, h))
    s = np.zeros((b, h, d, v.shape[-1])) if s0 is None else np.array(s0, np.float64)
    o = np.zeros(v.shape)
    for i in range(t):
        bt = beta[:, i][..., None, None]
        kk = np.einsum("bhd,bhe->bhde", k[:, i], k[:, i])
        kv = np.einsum("bhd,bhm->bhdm", k[:, i], v[:, i])
        s = np.exp(g[:, i])[..., None, None] * ((np.eye(d) - bt * kk) @ s) + bt * kv
        o[:, i] = np.einsum("bhdm,bhd->bhm", s, q[:, i])
    return o, s


def gated_recurrence_tf(q, k, v, log_gate, s0=None):
    """`gated_recurrence` in TF float64 ops, so GradientTape differentiates it."""
    q, k, v, g = (tf.cast(x, tf.float64) for x in (q, k, v, log_gate))
    b, t, h, d = q.shape
    g = tf.broadcast_to(g, (b, t, h))
    s = tf.zeros((b, h, d, v.shape[-1]), tf.float64) if s0 is None else tf.cast(s0, tf.float64)
    o = []
    for i in range(t):
        kv = tf.einsum("bhd,bhm->bhdm", k[:, i], v[:, i])
        s = tf.exp(g[:, i])[..., None, None] * s + kv
        o.append(tf.einsum("bhdm,bhd->bhm", s, q[:, i]))
    return tf.stack(o, 1), s


def delta_recurrence_tf(q, k, v, beta, log_gate=None, s0=None):
    """`delta_recurrence` in TF float64 ops, so GradientTape differentiates it."""
    q, k, v, beta = (tf.cast(x, tf.float64) for x in (q, k, v, beta))
    b, t, h, d = q.shape
    g = tf.zeros((b, t, h), tf.float64) if log_gate is None else tf.cast(log_gate, tf.float64)
    g = tf.broadcast_to(g, (b, t, h))
    s = tf.zeros((b, h, d, v.shape[-1]), tf.float64) if s0 is None else tf.cast(s0, tf.float64)
    o = []
    for i in range(t):
        bt = beta[:, i][..., None, None]
        kk = tf.einsum("bhd,bhe->bhde", k[:, i], k[:, i])
        kv = tf.einsum("bhd,bhm->bhdm", k[:, i], v[:, i])
        s = tf.exp(g[:, i])[..., None, None] * ((tf.eye(d, dtype=tf.float64) - bt * kk) @ s)
        s = s + bt * kv
        o.append(tf.einsum("bhdm,bhd->bhm", s, q[:, i]))
    return tf.stack(o, 1), s


# The explicit matrix and the (gated) delta rule in keras.ops, so that every
# Keras backend can differentiate them (in the inputs' dtype: JAX runs without
# x64 by default, so float64 would silently be float32 there).


def kernel_attention_ops(q, k, v, key_mask, causal, eps=EPS):
    """`kernel_attention` in keras.ops; `key_mask` (B, S) is required."""
    a = ops.einsum("bthd,bshd->bhts", q, k) * ops.cast(key_mask[:, None, None, :], q.dtype)
    if causal:
        a = a * ops.cast(ops.tril(ops.ones(a.shape[-2:])), q.dtype)
    a = a / (ops.sum(a, -1, keepdims=True) + eps)
    return ops.einsum("bhts,bshm->bthm", a, v)


def delta_recurrence_ops(q, k, v, beta, log_gate):
    """The (gated) delta rule token by token in keras.ops (`beta` None: the
    gated form, `gated_recurrence`), returning the outputs only."""
    b, t, h, d = q.shape
    state = ops.zeros((b, h, d, v.shape[-1]), q.dtype)
    outs = []
    for i in range(t):
        kt, vt = k[:, i], v[:, i]
        state = state * ops.exp(log_gate[:, i])[..., None, None]
        if beta is not None:
            recalled = ops.einsum("bhd,bhdm->bhm", kt, state)
            vt = beta[:, i][..., None] * (vt - recalled)
        state = state + ops.einsum("bhd,bhm->bhdm", kt, vt)
        outs.append(ops.einsum("bhd,bhdm->bhm", q[:, i], state))
    return ops.stack(outs, axis=1)


# Taylor and Hedgehog feature maps, and a layer through an explicit kernel.


def taylor_kernel(q, k):
    """`1 + s + s²/2`, `s = q·k/√D`: (B, T, H, D), (B, S, H, D) -> (B, H, T, S)."""
    s = tf.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    return 1.0 + s + 0.5 * s * s


def hedgehog(x, kernel, bias=None):
    """`[softmax(Wᵀx + b), softmax(−Wᵀx − b)]` per head; x (..., H, D), W (H, D, F)."""
    z = tf.einsum("...hd,hdf->...hf", x, kernel)
    if bias is not None:
        z = z + bias
    return tf.concat([tf.nn.softmax(z, -1), tf.nn.softmax(-z, -1)], -1)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kernel_layer_reference(w, x, kernel, causal, key_mask=None):
    """A LinearMultiHeadAttention forward pass from its weights `w` through
    the explicit T×S matrix of `kernel`, normalised row by row (+ eps)."""

    def proj(name):
        return tf.einsum("btd,dhk->bthk", x, w[f"{name}/kernel"]) + w[f"{name}/bias"]

    a = kernel(proj("query"), proj("key"))
    if key_mask is not None:
        a = a * tf.cast(key_mask, tf.float64)[:, None, None, :]
    if causal:
        a = a * np.tril(np.ones(a.shape[-2:]))
    a = a / (tf.reduce_sum(a, -1, keepdims=True) + EPS)
    out = tf.einsum("bhts,bshm->bthm", a, proj("value"))
    return (
        tf.einsum("bthk,hkd->btd", out, w["attention_output/kernel"]) + w["attention_output/bias"]
    )


# keras-hub's Transformer blocks, sublayer by sublayer, with the attention
# from `layer_reference` (float64).


def _layer_norm(layer, x):
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    gamma, beta = (tf.constant(w.numpy(), tf.float64) for w in (layer.gamma, layer.beta))
    return (x - mean) / tf.sqrt(var + layer.epsilon) * gamma + beta


def _dense(layer, x):
    return x @ tf.constant(layer.kernel.numpy(), tf.float64) + layer.bias.numpy()


def hub_block_reference(block, x, **attention_kwargs):
    """A keras-hub `TransformerDecoder` (self-attention only) or
    `TransformerEncoder` forward pass, relu feed-forward, no dropout."""
    x = tf.cast(x, tf.float64)

    def attention(y):
        w = layer_weights(block._self_attention_layer)
        return layer_reference(w, y, y, **attention_kwargs)

    def feedforward(y):
        return _dense(
            block._feedforward_output_dense,
            tf.nn.relu(_dense(block._feedforward_intermediate_dense, y)),
        )

    for sublayer, norm in (
        (attention, block._self_attention_layer_norm),
        (feedforward, block._feedforward_layer_norm),
    ):
        x = (
            x + sublayer(_layer_norm(norm, x))
            if block.normalize_first
            else _layer_norm(norm, x + sublayer(x))
        )
    return x


# Rotary position embeddings (RoFormer eq. 19): the numerator rotated, the
# normaliser not. Complex numbers, float64, TF ops (differentiable).


def rotary_rotate(x, start=0, max_wavelength=10000.0):
    """`(x_m + i x_{m+F/2}) · exp(i p θ_m)`, p = start + t, θ_m = λ^(−2m/F),
    back to `[real, imag]`: x (B, T, H, F)."""
    x = tf.cast(x, tf.float64)
    half = x.shape[-1] // 2
    theta = max_wavelength ** (-2.0 * np.arange(half) / x.shape[-1])
    angle = (start + np.arange(x.shape[1]))[:, None] * theta  # (T, F/2)
    z = tf.complex(x[..., :half], x[..., half:]) * np.exp(1j * angle)[None, :, None, :]
    return tf.concat([tf.math.real(z), tf.math.imag(z)], -1)


def rotary_attention(
    phi_q,
    phi_k,
    v,
    key_mask=None,
    causal=False,
    initial_state=None,
    start=0,
    max_wavelength=10000.0,
    eps=EPS,
):
    """Explicit T×S rotary linear attention, queries and keys both from
    `start`; `initial_state` `(kv, k_sum)` as if earlier keys were summed.
    Returns `(out, (kv, k_sum))`, kv of rotated keys, k_sum of plain ones."""
    phi_q, phi_k, v = (tf.cast(t, tf.float64) for t in (phi_q, phi_k, v))
    if key_mask is not None:
        keep = tf.cast(key_mask, tf.float64)[:, :, None, None]
        phi_k, v = phi_k * keep, v * keep
    rq, rk = (rotary_rotate(x, start, max_wavelength) for x in (phi_q, phi_k))
    scores = tf.einsum("bthd,bshd->bhts", rq, rk)
    kernel = tf.einsum("bthd,bshd->bhts", phi_q, phi_k)
    if causal:
        tril = np.tril(np.ones(scores.shape[-2:]))
        scores, kernel = scores * tril, kernel * tril
    numerator = tf.einsum("bhts,bshm->bthm", scores, v)
    denominator = tf.transpose(tf.reduce_sum(kernel, -1), (0, 2, 1))[..., None]
    kv, k_sum = tf.einsum("bshd,bshm->bhdm", rk, v), tf.reduce_sum(phi_k, 1)
    if initial_state is not None:
        kv0, k_sum0 = (tf.cast(s, tf.float64) for s in initial_state)
        numerator += tf.einsum("bthd,bhdm->bthm", rq, kv0)
        denominator += tf.einsum("bthd,bhd->bth", phi_q, k_sum0)[..., None]
        kv, k_sum = kv + kv0, k_sum + k_sum0
    return numerator / (denominator + eps), (kv, k_sum)


def rotary_layer_reference(w, query, value, max_wavelength, phi=elu_plus_one, **kwargs):
    """`layer_reference` with rotary attention (`kwargs` to `rotary_attention`)."""
    query, value = tf.cast(query, tf.float64), tf.cast(value, tf.float64)

    def proj(x, name):
        return tf.einsum("btd,dhk->bthk", x, w[f"{name}/kernel"]) + w[f"{name}/bias"]

    out, _ = rotary_attention(
        phi(proj(query, "query")),
        phi(proj(value, "key")),
        proj(value, "value"),
        max_wavelength=max_wavelength,
        **kwargs,
    )
    return (
        tf.einsum("bthk,hkd->btd", out, w["attention_output/kernel"]) + w["attention_output/bias"]
    )
