"""Kernel feature maps φ for linear attention.

`get(identifier)` turns a name (`"elu"`, `"relu"`, `"favor"`, `"taylor"`,
`"hedgehog"`), a config dict, a Keras layer (used as a trainable feature map)
or a plain callable into a layer that maps `(..., D)` to `(..., D')`. The
built-in maps make every kernel value `φ(q)·φ(k)` non-negative: elu+1,
relu, FAVOR and Hedgehog have non-negative features; Taylor's features can
be negative, but its kernel `1 + s + s²/2` is at least 1/2. The attention
layers apply φ with `apply(feature_map, x, role)`, which tells maps that
want it (FAVOR, Hedgehog) whether `x` holds queries or keys.
"""

from __future__ import annotations

import gc
import inspect
import math
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention.ops import _common

PACKAGE = "keras_linear_attention"


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeatureMap(keras.layers.Layer):
    """Base class: a layer applying φ to the last axis.

    Subclasses override `call` and, when φ changes the last dimension,
    `output_dim`. The attention layers call `redraw_if_due(training)` once
    per forward pass, before φ is applied to queries and keys. A `call` with
    a `role` argument receives `"query"` or `"key"` (see `apply`); it may
    scale φ(q) by any positive factor per query, and φ(k) by one positive
    factor shared by all keys of all calls: both cancel in the attention.
    It may also map queries and keys with different functions (Hedgehog's
    `separate_query_key`): the kernel is then `φ_q(q)·φ_k(k)`.
    """

    # True when φ maps each vector along the last axis on its own, whatever
    # the other axes are: the attention may then apply it to chunked
    # tensors (see `ops.causal.causal_attention_of_projections`).
    last_axis_only = False

    def output_dim(self, input_dim: int) -> int:
        return input_dim

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim(input_shape[-1]),)

    def output_dtype(self, input_dtype: str) -> str:
        """The dtype `call` returns: the compute dtype, unless a map computes
        in float32 whatever the policy (FAVOR, Taylor, Hedgehog)."""
        return self.compute_dtype

    def compute_output_spec(self, x, *args, **kwargs):
        # Keras's default spec takes the compute dtype: float16 under mixed
        # precision, where these maps return float32.
        shape = self.compute_output_shape(x.shape)
        return keras.KerasTensor(shape, dtype=self.output_dtype(x.dtype))

    def redraw_if_due(self, training: Any = None) -> None:
        """Hook for random feature maps; deterministic maps do nothing."""


@keras.saving.register_keras_serializable(package=PACKAGE)
class EluFeatureMap(FeatureMap):
    """φ(x) = elu(x) + 1, the default of "Transformers are RNNs"."""

    last_axis_only = True

    def call(self, x):
        return elu_plus_one(x)


def elu_plus_one(x: Any) -> Any:
    """`elu(x) + 1`, whose gradient `min(φ, 1)` needs only φ itself.

    Autodiff would keep `elu(x)` for its gradient besides φ: a second
    (batch, length, heads, dim) tensor per call, which matters at long N.
    """

    # Decorated per call: autograph unwraps a module-level custom gradient
    # when a user's tf.function calls this directly.
    @ops.custom_gradient
    def forward(x):
        phi = ops.elu(x) + ops.cast(1.0, x.dtype)

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream  # TF / JAX
            # `after`: else TF computes min(φ, 1) in the forward pass and
            # keeps it, a second φ-sized tensor, until this gradient runs.
            slope = ops.minimum(_common.scheduled_after(phi, upstream), ops.cast(1.0, phi.dtype))
            return upstream * slope

        return phi, grad

    return forward(x)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReluFeatureMap(FeatureMap):
    """φ(x) = relu(x). Rows that are all zero give a zero output (eps)."""

    last_axis_only = True

    def call(self, x):
        return ops.relu(x)


def orthogonal_random_features(
    input_dim: int, num_features: int, seed: Any = None, dtype: str = "float32"
) -> Any:
    """Return a `(input_dim, num_features)` matrix of orthogonal Gaussian rows.

    Blocks of `input_dim` mutually orthogonal directions (QR of a Gaussian
    matrix), each rescaled to the norm of an independent Gaussian vector so
    that every column is marginally N(0, I) (Performer, FAVOR+).
    """
    if not isinstance(seed, keras.random.SeedGenerator):
        seed = keras.random.SeedGenerator(seed)  # independent draws below
    blocks = math.ceil(num_features / input_dim)
    gaussian = keras.random.normal((blocks, input_dim, input_dim), seed=seed, dtype=dtype)
    q, r = ops.qr(gaussian)
    # Fix QR's sign ambiguity so Q is Haar-distributed (uniform directions);
    # without it the kernel estimate is biased.
    q = q * ops.sign(ops.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    directions = ops.reshape(ops.transpose(q, (0, 2, 1)), (-1, input_dim))[:num_features]
    chi = keras.random.normal((num_features, input_dim), seed=seed, dtype=dtype)
    norms = ops.sqrt(ops.sum(ops.square(chi), axis=-1))
    return ops.transpose(directions * norms[:, None])


# Largest exponent of a key feature of FAVOR: e^50 times 1e5 keys times 1e4
# (features, |values|) is 5e30, far below the float32 maximum (3.4e38, e^88.7).
# Higher would lift keys further from underflow (e^-87) but shrink gradients
# with respect to φ(k), which scale as 1/φ(k).
KEY_EXPONENT_BOUND = 50.0
_FLOAT32_MIN = -3.4028234663852886e38


@keras.saving.register_keras_serializable(package=PACKAGE)
class FavorFeatureMap(FeatureMap):
    """Positive orthogonal random features approximating the softmax kernel.

    `φ(x) = exp(Wᵀx' - |x'|²/2) / sqrt(m)` with `x' = x / D^{1/4}`, so that
    `E[φ(q)·φ(k)] = exp(q·k / sqrt(D))` (Performer's FAVOR+). `W` is a
    non-trainable weight: it is saved, exported and restored with the model.

    Called with `role="query"`, each row is divided by its largest feature;
    with `role="key"`, all rows by one constant set by `W` (at most
    `exp(KEY_EXPONENT_BOUND)`): factors that cancel in the attention, so
    large queries and keys do not underflow to zeros (Performer's
    stabiliser). `role=None` gives the formula above.

    Args:
        num_features: Number of random features `m`; defaults to `2 * D`.
        seed: Seed for `W` (and its redraws): same seed, same features.
        redraw_interval: If set, draw a fresh `W` every `redraw_interval`
            training calls (never at inference). `None` keeps `W` fixed.

    Example:

    >>> fm = FavorFeatureMap(num_features=32, seed=0)
    >>> fm(keras.ops.ones((2, 5, 4, 16))).shape
    TensorShape([2, 5, 4, 32])
    >>> phi_q = fm(8.0 * keras.ops.ones((1, 3, 2, 16)), role="query")
    >>> round(float(keras.ops.max(phi_q)) * 32**0.5, 4)  # largest feature: 1/sqrt(m)
    1.0
    """

    last_axis_only = True

    def __init__(
        self,
        num_features: int | None = None,
        seed: int | None = None,
        redraw_interval: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _checks.check_positive_int("num_features", num_features, allow_none=True)
        _checks.check_positive_int("redraw_interval", redraw_interval, allow_none=True)
        self.num_features = num_features
        self.seed = seed
        self.redraw_interval = redraw_interval
        self._seed_generator = keras.random.SeedGenerator(seed)

    def output_dim(self, input_dim: int) -> int:
        return self.num_features or 2 * input_dim

    def build(self, input_shape):
        self._input_dim = int(input_shape[-1])
        m = self.output_dim(self._input_dim)
        self.projection = self.add_weight(
            name="projection",
            shape=(self._input_dim, m),
            initializer=lambda shape, dtype=None: self._draw(),
            trainable=False,
            autocast=False,
        )
        if self.redraw_interval:
            self.calls = self.add_weight(
                name="calls", shape=(), dtype="int64", initializer="zeros", trainable=False
            )

    def _draw(self):
        m = self.output_dim(self._input_dim)
        return orthogonal_random_features(self._input_dim, m, seed=self._seed_generator)

    def redraw_if_due(self, training=None):
        if not (training and self.redraw_interval and self.built):
            return
        self.calls.assign_add(1)
        due = ops.equal(self.calls % self.redraw_interval, 0)
        self.projection.assign(ops.where(due, self._draw(), self.projection))

    def call(self, x, role=None):
        # Exponentials are computed in float32 even under mixed precision.
        x = ops.cast(x, "float32") * (self._input_dim**-0.25)
        proj = ops.einsum("...d,dm->...m", x, self.projection)
        exponent = proj - 0.5 * ops.sum(ops.square(x), axis=-1, keepdims=True)
        exponent = exponent - self._shift(exponent, role)
        return ops.exp(exponent) / math.sqrt(self.projection.shape[-1])

    def output_dtype(self, input_dtype: str) -> str:
        return "float32"

    def _shift(self, exponent: Any, role: str | None) -> Any:
        """What to subtract from the exponents of `role`'s features.

        Without it, entries of std ~6 at D = 16 give exponents below -87:
        φ underflows to exact zeros and those outputs to 0. Each shift is a
        factor that cancels in the attention ratio (see `FeatureMap`).
        """
        _check_role(role)
        if role == "query":
            # Per row: the largest feature of every query becomes 1/sqrt(m).
            # The floor keeps a row of -inf (|x|² overflowed) at 0, not NaN.
            row_max = ops.max(exponent, axis=-1, keepdims=True)
            return ops.stop_gradient(ops.maximum(row_max, _FLOAT32_MIN))
        if role == "key":
            # One data-independent constant, the same in every call (prefill
            # and steps share a state): w·x - |x|²/2 <= |w|²/2, so no key
            # exponent exceeds KEY_EXPONENT_BOUND. Keys are lifted by that
            # bound less max |w|²/2: by 38 at D = 16, by 3 at D = 64 (and
            # lowered at D >= ~100, where unshifted keys could overflow).
            half_sq_norms = 0.5 * ops.sum(ops.square(self.projection), axis=0)
            return ops.max(half_sq_norms) - KEY_EXPONENT_BOUND
        return 0.0

    # The seed generator's state is not a Keras weight, so `model.save` would
    # drop it and a reloaded model would redraw a different W than the
    # original. It is saved beside the weights; files without it still load.
    _SEED_STATE_KEY = "seed_generator_state"

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.redraw_interval:
            store[self._SEED_STATE_KEY] = self._seed_generator.state

    def load_own_variables(self, store):
        keys = [k for k in store.keys() if k != self._SEED_STATE_KEY]
        super().load_own_variables({k: store[k] for k in keys})
        if self.redraw_interval and self._SEED_STATE_KEY in store.keys():
            self._seed_generator.state.assign(store[self._SEED_STATE_KEY])

    def get_config(self):
        return {
            **super().get_config(),
            "num_features": self.num_features,
            "seed": self.seed,
            "redraw_interval": self.redraw_interval,
        }


def _compute_dtype(x: Any) -> str:
    """float64 for float64 inputs, else float32 (also for float16 inputs)."""
    return _float32_or_64(_checks.dtype_name(x))


def _float32_or_64(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _static_dim(x: Any, axis: int, what: str, owner: keras.layers.Layer) -> int:
    size = x.shape[axis] if len(x.shape) >= -axis else None
    if size is None:
        raise ValueError(
            f"{type(owner).__name__} {owner.name!r} needs a static {what} on axis {axis} "
            f"of its `inputs`; received shape {tuple(x.shape)}."
        )
    return int(size)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor features of the softmax kernel (Based, Arora et al. 2024).

    `φ(x) = [1, x / D^{1/4}, vec(x xᵀ) / (√2 √D)]`, so that
    `φ(q)·φ(k) = 1 + s + s²/2` with `s = q·k / √D`: the second-order Taylor
    expansion of softmax's `exp(s)`. Single features can be negative, but
    every kernel value is at least 1/2 (`1 + s + s²/2 = ((1 + s)² + 1) / 2`),
    so the attention's normaliser is at least half the number of keys.

    The feature dimension is `1 + D + D²` (273 at D = 16, 1057 at D = 32), and
    the causal state holds that many rows per head: meant for small key dims,
    paired with more heads. `compact=True` keeps each product `x_a x_b` once
    (a ≤ b, the products a < b scaled by √2 so that they count twice):
    `1 + D + D(D+1)/2` features (153 at D = 16), the same kernel.

    Computed in float32 (float64 for float64 inputs), also under mixed
    precision. The attention casts φ to float32 anyway, so this costs no
    memory there; in float16 the quadratic features would carry errors of
    about 1e-3·|q|²|k|²/(2D) in the kernel, large next to a kernel value near
    its minimum 1/2 (large q and k, nearly orthogonal).

    Args:
        compact: Keep each product `x_a x_b` once (see above).

    Example:

    >>> fm = TaylorFeatureMap()
    >>> fm(keras.ops.ones((2, 5, 4, 8))).shape  # 1 + 8 + 64 features
    TensorShape([2, 5, 4, 73])
    >>> q = k = keras.ops.ones((1, 4))  # s = q·k / √4 = 2
    >>> round(float(keras.ops.sum(fm(q) * fm(k))), 4)  # 1 + s + s²/2
    5.0
    >>> compact = TaylorFeatureMap(compact=True)
    >>> compact(q).shape, round(float(keras.ops.sum(compact(q) * compact(k))), 4)
    (TensorShape([1, 15]), 5.0)
    """

    last_axis_only = True

    def __init__(self, compact: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(compact, bool):
            raise TypeError(f"`compact` must be True or False; received {compact!r}.")
        self.compact = compact

    def output_dtype(self, input_dtype: str) -> str:
        return _float32_or_64(input_dtype)

    def output_dim(self, input_dim: int) -> int:
        d = int(input_dim)
        return 1 + d + (d * (d + 1) // 2 if self.compact else d * d)

    def call(self, x):
        x = ops.cast(x, _compute_dtype(x))
        d = _static_dim(x, -1, "feature dimension", self)
        linear = x * d**-0.25
        if self.compact:
            a, b = np.triu_indices(d)
            # x_a x_b / √D per pair; a diagonal term counts once, so over √2.
            scale = np.where(a == b, 0.5**0.5, 1.0)
            quadratic = ops.take(linear, a, axis=-1) * ops.take(linear, b, axis=-1)
            quadratic = quadratic * ops.convert_to_tensor(scale, x.dtype)
        else:
            y = x * (2.0 * d) ** -0.25  # y_a y_b = x_a x_b / (√2 √D)
            outer = ops.expand_dims(y, -1) * ops.expand_dims(y, -2)
            quadratic = ops.reshape(outer, (*ops.shape(x)[:-1], d * d))
        return ops.concatenate([ops.ones_like(x[..., :1]), linear, quadratic], axis=-1)

    def get_config(self):
        return {**super().get_config(), "compact": self.compact}


@keras.saving.register_keras_serializable(package=PACKAGE)
class HedgehogFeatureMap(FeatureMap):
    """Learnable features that mimic softmax (Hedgehog, Zhang et al. 2024).

    Per head h a trainable linear map `W_h` of shape `(D, F)`, then
    `φ(x) = [softmax(W_hᵀx), softmax(−W_hᵀx)]` over the feature axis: 2F
    positive features. Each `W_h` starts as the identity (rectangular when
    F ≠ D), so an untrained map gives `[softmax(x), softmax(−x)]`. It trains
    with the model, or can be fitted to mimic a softmax attention's weights.

    Inputs are `(..., H, D)` with the heads on axis -2, as the attention
    layers pass them (`(B, T, H, D)`, also one token at a time in recurrent
    steps). `build` takes H from the shape, so one instance serves one
    attention layer (whose heads it must match). The weights are `kernel`,
    `(H, D, F)`, and with `use_bias` a `bias`, `(H, F)` (zeros at first);
    with `separate_query_key`, `query_kernel` and `key_kernel` (and
    `query_bias`, `key_bias`) instead. They are saved, loaded and exported
    with the model. The softmax runs in float32 (float64 for float64
    inputs), also under mixed precision.

    Args:
        num_features: F, the size of `W_hᵀx`; defaults to D.
        use_bias: Add a trainable per-head bias to `W_hᵀx`.
        separate_query_key: One map for queries and another for keys, as
            the paper trains them (the kernel is then `φ_q(q)·φ_k(k)`); calls
            must then pass `role` (the attention layers do, see `apply`).
            Default: one map for both.

    Example:

    >>> fm = HedgehogFeatureMap()
    >>> x = keras.ops.zeros((2, 5, 3, 4))  # (batch, length, heads, key_dim)
    >>> fm(x).shape
    TensorShape([2, 5, 3, 8])
    >>> tuple(fm.kernel.shape)  # one identity-initialised (D, F) map per head
    (3, 4, 4)
    >>> [round(float(v), 4) for v in fm(x)[0, 0, 0]]  # softmax(0), twice
    [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    """

    last_axis_only = False  # each head has its own W: heads must stay on axis -2

    def __init__(
        self,
        num_features: int | None = None,
        use_bias: bool = False,
        separate_query_key: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _checks.check_positive_int("num_features", num_features, allow_none=True)
        for name, value in (("use_bias", use_bias), ("separate_query_key", separate_query_key)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False; received {value!r}.")
        self.num_features = num_features
        self.use_bias = use_bias
        self.separate_query_key = separate_query_key

    def output_dtype(self, input_dtype: str) -> str:
        return _float32_or_64(input_dtype)

    def output_dim(self, input_dim: int) -> int:
        return 2 * (self.num_features or int(input_dim))

    def build(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) < 2 or shape[-1] is None or shape[-2] is None:
            raise ValueError(
                "HedgehogFeatureMap needs `inputs` of shape (..., heads, key_dim) with "
                f"both known, heads on axis -2; received input_shape {shape}."
            )
        heads, dim = int(shape[-2]), int(shape[-1])
        feat = self.num_features or dim

        def identity(shape, dtype=None):
            return ops.broadcast_to(ops.eye(dim, feat, dtype=dtype or "float32"), shape)

        for role in ROLES if self.separate_query_key else (None,):
            prefix = f"{role}_" if role else ""
            kernel = self.add_weight(
                name=f"{prefix}kernel",
                shape=(heads, dim, feat),
                initializer=identity,
                autocast=False,
            )
            bias = None
            if self.use_bias:
                bias = self.add_weight(
                    name=f"{prefix}bias", shape=(heads, feat), initializer="zeros", autocast=False
                )
            setattr(self, f"{prefix}kernel", kernel)
            setattr(self, f"{prefix}bias", bias)

    def call(self, x, role=None):
        _check_role(role)
        if self.separate_query_key and role is None:
            raise ValueError(
                f"HedgehogFeatureMap {self.name!r} has separate_query_key=True: pass "
                '`role="query"` or `role="key"` (see `feature_maps.apply`).'
            )
        prefix = f"{role}_" if self.separate_query_key else ""
        kernel, bias = getattr(self, f"{prefix}kernel"), getattr(self, f"{prefix}bias")
        heads, dim, _ = kernel.shape
        for axis, what, built in ((-1, "key_dim", dim), (-2, "heads", heads)):
            size = _static_dim(x, axis, what, self)
            if size != built:
                raise ValueError(
                    f"HedgehogFeatureMap {self.name!r}: `inputs` have {what}={size} on "
                    f"axis {axis} (shape {tuple(x.shape)}), but it was built for "
                    f"{what}={built} (kernel {tuple(kernel.shape)}). Give each "
                    'attention layer its own map: feature_map="hedgehog" or a config.'
                )
        dtype = _compute_dtype(x)
        # Leading axes flattened first: the TF gradient of "...hd,hdf->...hf"
        # w.r.t. the kernel materialises the broadcast product (measured 50×
        # slower, most of a training step at B = 64, T = 64, H = 2, D = 32).
        flat = ops.reshape(ops.cast(x, dtype), (-1, heads, dim))
        z = ops.einsum("nhd,hdf->nhf", flat, ops.cast(kernel, dtype))
        z = ops.reshape(z, (*ops.shape(x)[:-1], kernel.shape[-1]))
        if bias is not None:
            z = z + ops.cast(bias, dtype)
        return ops.concatenate([ops.softmax(z, axis=-1), ops.softmax(-z, axis=-1)], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "num_features": self.num_features,
            "use_bias": self.use_bias,
            "separate_query_key": self.separate_query_key,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class CallableFeatureMap(FeatureMap):
    """Wraps a plain function `f(x) -> φ(x)` that keeps the last dimension.

    To save a model with it, register the function with
    `@keras.saving.register_keras_serializable()`.
    """

    def __init__(self, function: Callable | str | dict, **kwargs):
        super().__init__(**kwargs)
        if isinstance(function, (str, dict)):
            function = keras.saving.deserialize_keras_object(function)
        if not callable(function):
            raise TypeError(f"`function` must be callable; received {function!r}.")
        self.function = function

    def call(self, x):
        return self.function(x)

    def get_config(self):
        return {
            **super().get_config(),
            "function": keras.saving.serialize_keras_object(self.function),
        }


_BY_NAME = {
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "favor": FavorFeatureMap,
    "taylor": TaylorFeatureMap,
    "hedgehog": HedgehogFeatureMap,
}


def get(identifier: Any = "elu") -> keras.layers.Layer:
    """Return a feature-map layer from a name, config, layer or callable.

    Example:

    >>> get("elu")
    <EluFeatureMap name=elu_feature_map...>
    """
    if identifier is None:
        identifier = "elu"
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _BY_NAME:
            raise ValueError(
                f"Unknown `feature_map` {identifier!r}; expected one of "
                f"{sorted(_BY_NAME)}, a Keras layer or a callable."
            )
        return _BY_NAME[key]()
    if isinstance(identifier, dict):
        layer = keras.saving.deserialize_keras_object(identifier)
        if isinstance(layer, dict):  # not a Keras config: would recurse forever
            raise ValueError(
                f"`feature_map` config {identifier!r} is not a serialized Keras object; "
                "pass `feature_maps.serialize(fm)` (with 'class_name' and 'config'), "
                "a name or a layer."
            )
        return get(layer)
    if isinstance(identifier, keras.layers.Layer):
        return identifier
    if callable(identifier):
        return CallableFeatureMap(identifier)
    raise TypeError(
        f"`feature_map` must be a name, a Keras layer or a callable; received {identifier!r}."
    )


ROLES = ("query", "key")


def apply(feature_map: Callable, x: Any, role: str) -> Any:
    """φ(x) for `role` `"query"` or `"key"`; only a φ whose `call` takes a
    `role` argument (FAVOR, Hedgehog) receives it, other layers and functions
    get `x`.

    Example:

    >>> apply(get("elu"), keras.ops.zeros((1, 2, 1, 3)), "key").shape
    TensorShape([1, 2, 1, 3])
    """
    _check_role(role)
    if "role" in inspect.signature(getattr(feature_map, "call", feature_map)).parameters:
        return feature_map(x, role=role)
    return feature_map(x)


def _check_role(role: Any) -> None:
    if role is not None and role not in ROLES:
        raise ValueError(f"`role` must be one of {ROLES} or None; received {role!r}.")


# Feature map -> weak reference to the one attention layer that uses it.
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adopt(feature_map: keras.layers.Layer, owner: keras.layers.Layer) -> keras.layers.Layer:
    """Record `owner` as the attention layer of `feature_map`; refuse a second.

    Two layers sharing one φ save its weights once, under the first, and a
    reloaded model (one φ per layer) fails: "expected 1 variables, but
    received 0".

    Example:

    >>> from keras_linear_attention import LinearMultiHeadAttention
    >>> fm = FavorFeatureMap(seed=4)
    >>> first = LinearMultiHeadAttention(2, 8, feature_map=fm, name="first")
    >>> LinearMultiHeadAttention(2, 8, feature_map=fm)
    Traceback (most recent call last):
    ...
    ValueError: This `feature_map` (...) is already used by the attention layer 'first'; ...
    """
    if _owner(feature_map) not in (None, owner):
        gc.collect()  # the other may be garbage not yet collected (a re-run cell)
    other = _owner(feature_map)
    if other is not None and other is not owner:
        raise ValueError(
            f"This `feature_map` ({feature_map.name}) is already used by the "
            f"attention layer {other.name!r}; one φ layer cannot be shared, as "
            "a saved model would not load. Pass each attention layer its own: "
            "a name or config (`feature_maps.serialize(fm)`), or a fresh instance "
            "(a FavorFeatureMap with the same seed draws the same features)."
        )
    _OWNERS[feature_map] = weakref.ref(owner)
    return feature_map


def _owner(feature_map: keras.layers.Layer) -> keras.layers.Layer | None:
    ref = _OWNERS.get(feature_map)
    return None if ref is None else ref()


def output_dim(feature_map: keras.layers.Layer, input_dim: int) -> int:
    """Feature dimension D' that `feature_map` produces from `input_dim`."""
    if isinstance(feature_map, FeatureMap):
        return feature_map.output_dim(input_dim)
    return int(feature_map.compute_output_shape((None, input_dim))[-1])


def maps_last_axis_only(feature_map: Any) -> bool:
    """Whether `feature_map` may be applied to any layout with features last."""
    return bool(getattr(feature_map, "last_axis_only", False))


def redraw_if_due(feature_map: keras.layers.Layer, training: Any = None) -> None:
    """Let a random feature map redraw; plain Keras layers have no such hook."""
    hook = getattr(feature_map, "redraw_if_due", None)
    if hook is not None:
        hook(training)


def serialize(feature_map: keras.layers.Layer) -> Any:
    return keras.saving.serialize_keras_object(feature_map)
