"""`LinearMultiHeadAttention`: a drop-in for `keras.layers.MultiHeadAttention`."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention._keras_compat import get_keras_mask, set_keras_mask
from keras_linear_attention.layers import _masks
from keras_linear_attention.ops import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_EPS,
    causal_linear_attention,
    kernel_attention_scores,
    linear_attention,
)
from keras_linear_attention.ops._common import accumulation_dtype, poison_on_failure
from keras_linear_attention.ops.causal import causal_attention_of_projections
from keras_linear_attention.ops.rotary import (
    check_even_features,
    check_max_wavelength,
    rotary_attention_scores,
    rotary_causal_linear_attention,
    rotary_linear_attention,
)
from keras_linear_attention.ops.scores import check_threshold

PACKAGE = "keras_linear_attention"


@keras.saving.register_keras_serializable(package=PACKAGE)
class LinearMultiHeadAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention in linear time ("Transformers are RNNs").

    Same arguments, call signature, sublayers (`query`, `key`, `value`,
    `attention_output`) and weights as `keras.layers.MultiHeadAttention`,
    so `lin.set_weights(mha.get_weights())` works, but softmax(QKᵀ)V is
    replaced by kernel attention `φ(Q)(φ(K)ᵀV)` normalised by
    `φ(Q)(φ(K)ᵀ1) + eps`. Time and memory grow linearly with sequence length.

    Args:
        num_heads, key_dim, value_dim, use_bias, output_shape,
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint, use_gate, seed: as in `MultiHeadAttention`.
        dropout: Attention dropout. Softmax attention drops entries of the
            T×S matrix, which linear attention never builds; here each key
            (per batch item and head) is dropped from the numerator with
            probability `dropout` and the rest scaled by `1/(1 - dropout)`,
            the same mask for every query. The expected output equals the
            no-dropout output, as with softmax attention dropout.
        attention_axes: `None` (or all axes between batch and features):
            inputs of rank > 3 are attended over their flattened positions.
            Attending over a subset of axes is refused.
        sliding_window: Not supported (raises if set).
        flash_attention: Not applicable: linear attention never builds the
            T×S matrix. `None`/`False` only.
        feature_map: φ: `"elu"` (elu+1, default), `"relu"`, `"favor"`, a
            Keras layer (trainable φ) or a callable. See `feature_maps`.
            φ takes this layer's dtype policy, as every sublayer does.
        eps: Added to the normaliser (default 1e-6).
        chunk_size: Tokens per chunk of the causal algorithm (speed only).
        short_sequence_threshold: Sequences of at most this many positions
            (query and key lengths) are computed through the explicit
            masked T×S kernel matrix, which is faster there; longer ones in
            linear time. The same result to float rounding (speed only).
            None: the measured defaults, 256 causal and 64 non-causal
            (`ops.causal`/`ops.noncausal.DEFAULT_SHORT_SEQUENCE_THRESHOLD`);
            0: never. A length known only at run time is compared at run
            time.
        rotary_max_wavelength: None (default): no position information,
            as in the paper. A positive float: rotary position embeddings
            (RoPE, RoFormer's linear-attention form, eq. 19) with this
            max wavelength (10000.0 is common): φ(q) and φ(k) are rotated
            in the numerator only, the normaliser keeps the unrotated
            kernel, and the state keeps its shapes (`kv` sums rotated
            keys). Needs an even feature-map dimension; the explicit T×S
            path (`short_sequence_threshold`) is not used with it.

    Call arguments:
        query: `(B, T, dim)` (or `(B, *positions, dim)`).
        value: `(B, S, dim)`.
        key: Optional `(B, S, dim)`; defaults to `value`.
        query_mask: `(B, T)` (default: the Keras mask of `query`); False
            marks a padded query: a fully masked row (see below). The
            mask is propagated to the output.
        value_mask, key_mask: `(B, S)`; padded keys are removed from the sums.
        attention_mask: Read as Keras reads it: `(T, S)` (shared by every
            batch row), `(B, T, S)` or `(B, heads, T, S)`, where B, heads
            and T may be 1. Linear attention computes exactly, and so
            accepts, the masks that are, per batch row and alike for every
            head, `rows[i] & keys[j]` (query padding times key padding) or
            that `& (j <= i)` (causal: Keras's top-left `tril` of T×S, also
            for T != S); with `use_causal_mask=True` the mask is first
            ANDed with `tril`, as in Keras. Anything else raises a
            `ValueError` naming `attention_mask`. The shape cannot tell
            these apart, so the values decide, at the cost of a few
            O(B·T·S) boolean passes over the mask (only when a dense mask
            with a query axis is given). Values known at call time (NumPy,
            eager or constant tensors, also inside `tf.function`) are read
            then: the check raises at once and the causal choice is
            static. A mask known only at run time is checked in the graph
            (an assertion; under XLA, which drops assertions, a NaN
            output), and without `use_causal_mask` the graph holds both
            the causal and the global computation under a `cond`, one of
            which runs.
            Fully masked rows (a padded query, or one that sees no key):
            Keras's default (fused, `dot_product_attention`) path gives
            them the softmax of equal logits, the plain average of all S
            values (padded and future ones included); so does this layer,
            exactly (its `return_attention_scores` row is uniform, 1/S).
            Keras's explicit-softmax path (dropout > 0, attention scores
            returned, several attention axes) gives 0 there instead.
        return_attention_scores: Also return the normalised `(B, H, T, S)`
            kernel-attention matrix. This is a quadratic-cost diagnostic.
        training: Enables dropout and random-feature redraws.
        use_causal_mask: Causal attention, computed chunkwise with prefix
            sums; no T×S mask is built. As in Keras, query i sees keys
            j <= i also when T != S (top-left aligned: for S > T the last
            S - T keys are seen by no query, for T > S queries i >= S see
            every key).

    Example:

    >>> layer = LinearMultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = keras.random.normal((3, 10, 16))
    >>> layer(x, x, use_causal_mask=True).shape
    TensorShape([3, 10, 16])
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: Any = None,
        attention_axes: Any = None,
        sliding_window: int | None = None,
        flash_attention: bool | None = None,
        feature_map: Any = "elu",
        eps: float = DEFAULT_EPS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        short_sequence_threshold: int | None = None,
        rotary_max_wavelength: float | None = None,
        **kwargs,
    ):
        _refuse_softmax_options(sliding_window, flash_attention)
        _check_numeric_args(dropout, eps, chunk_size)
        check_threshold(short_sequence_threshold)
        if rotary_max_wavelength is not None:
            check_max_wavelength(rotary_max_wavelength, "rotary_max_wavelength")
        # Keras's flash-attention bookkeeping does not apply; hand it
        # dropout=0 so a global `enable_flash_attention()` cannot object.
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=0.0,
            use_bias=use_bias,
            output_shape=output_shape,
            attention_axes=attention_axes,
            flash_attention=False,
            **kwargs,
        )
        self._dropout = float(dropout)
        self._flash_attention = False
        self._eps = float(eps)
        self._chunk_size = chunk_size
        self._short_sequence_threshold = (
            None if short_sequence_threshold is None else int(short_sequence_threshold)
        )
        self._rotary_max_wavelength = (
            None if rotary_max_wavelength is None else float(rotary_max_wavelength)
        )
        # One attention layer per φ instance: shared, it would not reload.
        self._feature_map = fm_lib.adopt(fm_lib.get(feature_map), self)
        # φ runs inside this layer, in its dtype policy (as its other sublayers).
        self._feature_map.dtype_policy = self.dtype_policy

    @property
    def feature_map(self) -> keras.layers.Layer:
        return self._feature_map

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("sliding_window", None)
        config.update(
            feature_map=fm_lib.serialize(self._feature_map),
            eps=self._eps,
            chunk_size=self._chunk_size,
            short_sequence_threshold=self._short_sequence_threshold,
            rotary_max_wavelength=self._rotary_max_wavelength,
        )
        return config

    @property
    def state_shapes(self) -> tuple:
        """Shapes, without the batch axis, of the causal self-attention's
        state `(kv, k_sum)`: `(H, F, M)` and `(H, F)`, F = φ's dimension."""
        feat = fm_lib.output_dim(self._feature_map, self._key_dim)
        return (self._num_heads, feat, self._value_dim), (self._num_heads, feat)

    @property
    def state_dtype(self) -> str:
        """float32 (float64 for a float64 layer), whatever the compute dtype."""
        return "float64" if self.compute_dtype == "float64" else "float32"

    def get_initial_state(self, batch_size: Any) -> tuple:
        """Zero state for `batch_size` sequences, one tensor per `state_shapes`."""
        dtype = self.state_dtype
        return tuple(ops.zeros((batch_size, *shape), dtype) for shape in self.state_shapes)

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        if not self._feature_map.built:
            self._feature_map.build((None, None, self._num_heads, self._key_dim))
        if self._rotary_max_wavelength is not None:
            feat = fm_lib.output_dim(self._feature_map, self._key_dim)
            check_even_features(feat, "the feature map's output", "rotary_max_wavelength")

    def _build_attention(self, rank):
        all_axes = tuple(range(1, rank - 2))
        if self._attention_axes is not None:
            axes = tuple(a if a >= 0 else (rank - 1) + a for a in self._attention_axes)
            if tuple(sorted(axes)) != all_axes:
                raise ValueError(
                    f"`attention_axes={self._attention_axes}` attends over a "
                    "subset of the positional axes, which LinearMultiHeadAttention "
                    f"does not support; use None (all of {all_axes}, flattened)."
                )
        self._attention_axes = all_axes
        # One dropout mask per (batch, key, head), shared by all queries.
        self._dropout_layer = keras.layers.Dropout(
            rate=self._dropout,
            noise_shape=(None, None, None, 1),
            seed=self.seed,
            dtype=self.dtype_policy,
        )

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        key = value if key is None else key
        self._check_inputs(query, value, key)
        if query_mask is None:
            query_mask = get_keras_mask(query)
        for x in (query, value, key):
            set_keras_mask(x, None)
        plan = _masks.plan(
            query,
            value,
            self._num_heads,
            attention_mask=attention_mask,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            causal=bool(use_causal_mask),
        )
        out, scores, _ = self._compute_attention(
            query,
            key,
            value,
            plan.keys,
            causal=plan.causal,
            training=training,
            return_scores=return_attention_scores,
            rows=plan.rows,
        )
        out = poison_on_failure(out, plan.validity)
        if query_mask is not None:
            set_keras_mask(out, query_mask)
        return (out, scores) if return_attention_scores else out

    def _compute_attention(
        self,
        query,
        key,
        value,
        key_padding,
        causal,
        training,
        return_scores=False,
        initial_state=None,
        return_state=False,
        rows=False,
        start_index=0,
    ):
        """Project, apply φ, run the linear-attention math, project back.

        `key_padding` (B, S), `rows` (B, T) and `causal` as in
        `_masks.Plan`; causal is top-left aligned (query i sees keys
        j <= i, any T and S). With `rows` (None: no query padding), a query
        that sees no key (a fully masked row) gets what Keras's fused
        softmax path gives it, the plain average of all S values; with
        `rows=False` (callers outside Keras's mask semantics, e.g. the
        recurrent `CausalLinearAttention`) it gets 0, as the state does.
        `start_index` is the absolute position of the first query and key
        (with rotary embeddings and an `initial_state`; else unused).
        Returns `(out, scores, state)`; scores and state are None unless
        asked for.
        """
        q_positions = ops.shape(query)[1:-1]
        k_positions = ops.shape(key)[1:-1]
        gate = self._gate_dense(query) if self._use_gate else None
        q = _flatten_positions(self._query_dense(query))
        k = _flatten_positions(self._key_dense(key))
        v = _flatten_positions(self._value_dense(value))
        fm_lib.redraw_if_due(self._feature_map, training)
        v = self._dropout_layer(v, training=training)
        state = None
        t, s = _length(q), _length(k)
        plan = _masks.Plan(key_padding, None if rows is False else rows, causal, None)

        def causal_path():
            kc, vc, keys = k, v, key_padding
            if not (query is key or query is value):  # cross-attention: any T, S
                kc, vc, keys = _masks.align_causal_keys(k, v, key_padding, t)
            return self._causal_attention(q, kc, vc, keys, initial_state, return_state, start_index)

        def global_path():
            phi_q = fm_lib.apply(self._feature_map, q, "query")
            phi_k = fm_lib.apply(self._feature_map, k, "key")
            if self._rotary_max_wavelength is not None:
                return rotary_linear_attention(
                    phi_q,
                    phi_k,
                    v,
                    key_mask=key_padding,
                    eps=self._eps,
                    max_wavelength=self._rotary_max_wavelength,
                )
            return linear_attention(
                phi_q,
                phi_k,
                v,
                key_mask=key_padding,
                eps=self._eps,
                short_sequence_threshold=self._short_sequence_threshold,
            )

        if causal is True:
            result = causal_path()
            out, state = result if return_state else (result, None)
        elif causal is False:
            out = global_path()
        else:  # decided by a dense mask's values at run time
            out = ops.cond(causal, causal_path, global_path)
        visible = None if rows is False else _masks.visible_rows(plan, t, s)
        if visible is not None:
            # Keras (fused path) gives a fully masked row the softmax of
            # equal logits: the plain average of all S values.
            acc = accumulation_dtype(v)
            average = ops.mean(ops.cast(v, acc), axis=1, keepdims=True)
            keep = ops.reshape(visible, (ops.shape(visible)[0], -1, 1, 1))
            out = ops.where(keep, out, ops.cast(average, out.dtype))
        out = ops.reshape(out, _concat_shape(ops.shape(out)[:1], q_positions, out.shape[-2:]))
        if gate is not None:
            out = out * gate
        out = self._output_dense(out)
        scores = None
        if return_scores:
            phi = (
                fm_lib.apply(self._feature_map, q, "query"),
                fm_lib.apply(self._feature_map, k, "key"),
            )
            score = lambda c: self._scores(*phi, key_padding, c)
            if isinstance(causal, bool):
                scores = score(causal)
            else:
                scores = ops.where(causal, score(True), score(False))
            if visible is not None:  # fully masked rows: uniform, as `out`
                keep = ops.reshape(visible, (ops.shape(visible)[0], 1, -1, 1))
                scores = ops.where(keep, scores, 1.0 / ops.cast(s, scores.dtype))
            scores = ops.reshape(
                ops.cast(scores, self.compute_dtype),
                _concat_shape(ops.shape(scores)[:2], q_positions, k_positions),
            )
        return out, scores, state

    def _scores(self, phi_q, phi_k, key_padding, causal):
        if self._rotary_max_wavelength is None:
            return kernel_attention_scores(
                phi_q, phi_k, key_mask=key_padding, causal=causal, eps=self._eps
            )
        return rotary_attention_scores(
            phi_q,
            phi_k,
            key_mask=key_padding,
            causal=causal,
            eps=self._eps,
            max_wavelength=self._rotary_max_wavelength,
        )

    def _causal_attention(self, q, k, v, key_padding, initial_state, return_state, start_index):
        if self._rotary_max_wavelength is not None:
            return rotary_causal_linear_attention(
                fm_lib.apply(self._feature_map, q, "query"),
                fm_lib.apply(self._feature_map, k, "key"),
                v,
                start_index=start_index,
                key_mask=key_padding,
                initial_state=initial_state,
                return_state=return_state,
                eps=self._eps,
                chunk_size=self._chunk_size,
                max_wavelength=self._rotary_max_wavelength,
            )
        kwargs = dict(
            key_mask=key_padding,
            initial_state=initial_state,
            chunk_size=self._chunk_size,
            eps=self._eps,
            return_state=return_state,
            short_sequence_threshold=self._short_sequence_threshold,
        )
        if fm_lib.maps_last_axis_only(self._feature_map):
            # φ on the chunks: what φ keeps for its gradient is then what the
            # attention needs, not a second, unchunked copy (memory at long N).
            return causal_attention_of_projections(q, k, v, self._feature_map, **kwargs)
        return causal_linear_attention(
            fm_lib.apply(self._feature_map, q, "query"),
            fm_lib.apply(self._feature_map, k, "key"),
            v,
            **kwargs,
        )

    def _check_inputs(self, query, value, key):
        layout = "(batch, positions..., features)"
        for name, x in (("query", query), ("value", value), ("key", key)):
            _checks.check_float(name, x)
            if len(x.shape) < 3:
                raise ValueError(
                    f"`{name}` must have rank >= 3 with layout {layout}; "
                    f"received shape {tuple(x.shape)}."
                )
            for axis in range(1, len(x.shape) - 1):
                _checks.check_nonempty(name, x, axis)
        if not (len(query.shape) == len(value.shape) == len(key.shape)):
            raise ValueError(
                "`query`, `value` and `key` must have the same rank; received "
                f"shapes {tuple(query.shape)}, {tuple(value.shape)}, {tuple(key.shape)}."
            )
        if tuple(key.shape[1:-1]) != tuple(value.shape[1:-1]):
            raise ValueError(
                "All dimensions of `value` and `key`, except the last one, must "
                f"be equal. Received: value_shape={tuple(value.shape)} and "
                f"key_shape={tuple(key.shape)}"
            )
        if self.built:
            for name, x, dense in (
                ("query", query, self._query_dense),
                ("key", key, self._key_dense),
                ("value", value, self._value_dense),
            ):
                _checks.check_dim(
                    f"`{name}` feature dim",
                    x.shape[-1],
                    "the size it was built with",
                    dense.kernel.shape[0],
                )

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        out = keras.KerasTensor(
            self.compute_output_shape(query.shape, value.shape, None if key is None else key.shape),
            dtype=self.compute_dtype,
        )
        if not return_attention_scores:
            return out
        shape = (query.shape[0], self._num_heads, *query.shape[1:-1], *value.shape[1:-1])
        return out, keras.KerasTensor(shape, dtype=self.compute_dtype)


def _flatten_positions(x: Any) -> Any:
    """(B, *positions, H, F) -> (B, N, H, F)."""
    if len(x.shape) == 4:
        return x
    return ops.reshape(x, (ops.shape(x)[0], -1, x.shape[-2], x.shape[-1]))


def _concat_shape(*parts: Any) -> tuple:
    return tuple(d for part in parts for d in part)


def _length(x: Any) -> Any:
    """`x.shape[1]`, or a scalar tensor when known only at run time."""
    return x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]


def _refuse_softmax_options(sliding_window: Any, flash_attention: Any) -> None:
    if sliding_window is not None:
        raise ValueError(
            "`sliding_window` is not supported by LinearMultiHeadAttention: the "
            "linear form sums over all (or, causally, all earlier) keys. "
            f"Received sliding_window={sliding_window!r}; leave it None."
        )
    if flash_attention:
        raise ValueError(
            "`flash_attention` is a softmax kernel option; linear attention never "
            "builds the T×S matrix, so it does not apply. Leave it None."
        )


def _check_numeric_args(dropout: Any, eps: Any, chunk_size: Any) -> None:
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be a float in [0, 1); received {dropout!r}.")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"`eps` must be a non-negative float; received {eps!r}.")
    _checks.check_positive_int("chunk_size", chunk_size)
