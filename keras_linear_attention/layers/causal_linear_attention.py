"""`CausalLinearAttention`: causal self-attention that is also an RNN."""

from __future__ import annotations

import keras
from keras import ops

from keras_linear_attention import _checks
from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention._keras_compat import get_keras_mask, set_keras_mask
from keras_linear_attention.layers import _masks
from keras_linear_attention.layers import _recurrence as rec
from keras_linear_attention.layers.linear_multi_head_attention import (
    PACKAGE,
    LinearMultiHeadAttention,
)
from keras_linear_attention.layers.short_convolution import ShortConvolution


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalLinearAttention(LinearMultiHeadAttention):
    """Causal multi-head linear self-attention with a recurrent state.

    Position i attends to positions j ≤ i. The prefix sums
    `(kv, k_sum) = (Σ φ(k_j) v_jᵀ, Σ φ(k_j))` are an RNN state: call the layer
    on a prompt with `return_state=True`, then on one token at a time with
    `initial_state=state`; each step costs the same whatever the context
    length, and prefill-then-step outputs equal the parallel outputs.

    Constructor arguments are those of `LinearMultiHeadAttention` (weights
    and sublayer names match `keras.layers.MultiHeadAttention`, so a causal
    self-attention MHA's weights load with `set_weights`), and:

    Args:
        recurrence: How the state is updated (see `ops.recurrences`):
            `"linear"` (default): the paper's `S += φ(k)vᵀ` with the
                normaliser, state `(kv, k_sum)`;
            `"retention"`: `S = γ_h S + k vᵀ`, RetNet's fixed per-head decay
                `γ_h = 1 − 2^(−5−h)`, no new weights;
            `"gated"`: `S = a_t S + k vᵀ` with `a_t = exp(−softplus(x w + b))`
                per head and token (sublayer `decay`, starting at RetNet's
                decays);
            `"delta"`: the delta rule with `β_t = sigmoid(x w_β)` (sublayer
                `beta`); `"gated_delta"`: both.
            All but `"linear"` L2-normalise q and k, have no normaliser and
            one state tensor `(B, H, D, M)`; `feature_map` must stay "elu"
            (unused) for them.
        output_norm: RMS-normalise each head's output before the output
            projection (sublayer `output_norm`). Default: on for every
            recurrence but `"linear"`.
        conv_size: Optional K: a short causal depthwise convolution (with
            SiLU) on q, k and v before the recurrence (sublayers
            `query_conv`, `key_conv`, `value_conv`; see `ShortConvolution`),
            for the recurrences other than `"linear"`. Its windows, the last
            K − 1 projected tokens, join the state.
        rotary_max_wavelength: As in `LinearMultiHeadAttention` (rotary
            position embeddings); with `recurrence="linear"` only. A call
            that continues a sequence from `initial_state` then needs
            `start_index`.

    Call arguments:
        inputs: `(B, N, dim)` float tensor.
        padding_mask: Optional `(B, N)` mask, truthy for real tokens; padded
            tokens add nothing to the state. Defaults to the Keras mask of
            `inputs` (e.g. from `Embedding(mask_zero=True)`).
        initial_state: Optional `(kv, k_sum)` from `get_initial_state` or a
            previous call: shapes `(B, H, D', value_dim)` and `(B, H, D')`,
            float32 (D' is the feature-map dimension).
        return_state: Also return the final state.
        training: Enables dropout and random-feature redraws.
        start_index: Absolute position of the first token of `inputs` (an
            int or a scalar tensor; default 0): with `rotary_max_wavelength`
            and an `initial_state`, the number of tokens that state holds.
            Ignored without rotary embeddings.

    Example:

    >>> layer = CausalLinearAttention(num_heads=2, key_dim=8)
    >>> prompt = keras.random.normal((1, 5, 16))
    >>> out, state = layer(prompt, return_state=True)
    >>> token = keras.random.normal((1, 1, 16))
    >>> out, state = layer(token, initial_state=state, return_state=True)
    >>> out.shape
    TensorShape([1, 1, 16])
    """

    def __init__(
        self,
        *args,
        recurrence: str = "linear",
        output_norm: bool | None = None,
        conv_size: int | None = None,
        **kwargs,
    ):
        rec.check_recurrence(recurrence)
        _checks.check_positive_int("conv_size", conv_size, allow_none=True)
        if conv_size is not None and recurrence == "linear":
            raise ValueError(
                "`conv_size` applies to the recurrences other than 'linear' (whose state "
                "is the paper's (kv, k_sum)); received it with recurrence='linear'."
            )
        super().__init__(*args, **kwargs)
        if recurrence != "linear" and not isinstance(self._feature_map, fm_lib.EluFeatureMap):
            raise ValueError(
                f"`feature_map` applies to recurrence='linear' only; recurrence="
                f"{recurrence!r} L2-normalises q and k. Leave feature_map at its default."
            )
        if recurrence != "linear" and self._rotary_max_wavelength is not None:
            raise ValueError(
                "`rotary_max_wavelength` applies to recurrence='linear' only (whose state "
                f"has a normaliser to keep unrotated); received recurrence={recurrence!r}."
            )
        self.recurrence = recurrence
        self.output_norm = recurrence != "linear" if output_norm is None else bool(output_norm)
        self.conv_size = conv_size

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "recurrence": self.recurrence,
            "output_norm": self.output_norm,
            "conv_size": self.conv_size,
        }

    def build(self, inputs_shape):
        super().build(inputs_shape, inputs_shape)
        dense = self._get_common_kwargs_for_sublayer()  # initializers, dtype policy, ...
        self._decay_dense = self._beta_dense = self._output_norm = None
        if self.recurrence in rec.GATED:
            self._decay_dense = rec.per_head_dense("decay", self._num_heads, **dense)
            self._decay_dense.build(inputs_shape)
            rec.init_decay_bias(self._decay_dense, self._num_heads)
        if self.recurrence in rec.DELTA:
            self._beta_dense = rec.per_head_dense("beta", self._num_heads, **dense)
            self._beta_dense.build(inputs_shape)
        if self.output_norm:
            self._output_norm = keras.layers.RMSNormalization(
                epsilon=1e-6, name="output_norm", dtype=self.dtype_policy
            )
            self._output_norm.build((None, None, self._num_heads, self._value_dim))
        self._convs = None
        if self.conv_size is not None:
            dims = (self._key_dim, self._key_dim, self._value_dim)
            self._convs = [
                ShortConvolution(self.conv_size, name=f"{name}_conv", dtype=self.dtype_policy)
                for name in ("query", "key", "value")
            ]
            for conv, dim in zip(self._convs, dims, strict=True):
                conv.build((None, None, self._num_heads, dim))

    def call(
        self,
        inputs,
        padding_mask=None,
        initial_state=None,
        return_state=False,
        training=None,
        start_index=0,
    ):
        self._check_inputs(inputs, inputs, inputs)
        if len(inputs.shape) != 3:
            raise ValueError(
                "`inputs` must have shape (batch, length, features); received "
                f"{tuple(inputs.shape)}."
            )
        keras_mask = get_keras_mask(inputs)
        if padding_mask is None:
            padding_mask = keras_mask
        set_keras_mask(inputs, None)
        key_padding = _masks.flatten_mask("padding_mask", padding_mask, tuple(inputs.shape[:-1]))
        if self.recurrence != "linear":
            out, state = self._compute_recurrence(inputs, key_padding, initial_state, training)
            if keras_mask is not None:
                set_keras_mask(out, keras_mask)
            return (out, state) if return_state else out
        out, _, state = self._compute_attention(
            inputs,
            inputs,
            inputs,
            key_padding,
            causal=True,
            training=training,
            initial_state=initial_state,
            return_state=return_state,
            start_index=start_index,
        )
        if keras_mask is not None:
            set_keras_mask(out, keras_mask)
        return (out, state) if return_state else out

    def _compute_recurrence(self, inputs, key_padding, initial_state, training):
        """Project, run a decayed/gated/delta recurrence, normalise, project back."""
        state, windows = (None, None) if initial_state is None else self._split(initial_state)
        q, k, v = self._query_dense(inputs), self._key_dense(inputs), self._value_dense(inputs)
        if self._convs is not None:
            (q, k, v), windows = self._convolve((q, k, v), key_padding, windows)
        q, k = rec.l2_normalize(q), rec.l2_normalize(k)
        v = self._dropout_layer(v, training=training)
        log_gate = beta = None
        if self.recurrence == "retention":
            log_gate = ops.convert_to_tensor(rec.retention_log_decay(self._num_heads), q.dtype)
        elif self._decay_dense is not None:
            log_gate = -ops.softplus(ops.cast(self._decay_dense(inputs), q.dtype))
        if self._beta_dense is not None:
            beta = ops.sigmoid(ops.cast(self._beta_dense(inputs), q.dtype))
        k, v, log_gate, beta = rec.mask_padded(key_padding, k, v, log_gate, beta)
        step = state is not None and inputs.shape[1] == 1
        out, state = rec.attend(
            self.recurrence, q, k, v, log_gate, beta, state, self._chunk_size, step
        )
        out = ops.cast(out, self.compute_dtype)
        if self._output_norm is not None:
            out = self._output_norm(out)
        if self._use_gate:
            out = out * self._gate_dense(inputs)
        return self._output_dense(out), (state, *(windows or ()))

    def _split(self, initial_state) -> tuple:
        """`(S, windows or None)` from a state tuple of `len(state_names)`."""
        if not isinstance(initial_state, (tuple, list)):
            initial_state = (initial_state,)
        names = self.state_names
        if len(initial_state) != len(names):
            raise ValueError(
                f"`initial_state` must hold {len(names)} tensors {names}; "
                f"received {len(initial_state)}."
            )
        return initial_state[0], (list(initial_state[1:]) or None)

    def _convolve(self, tensors, keep, windows) -> tuple:
        """q, k, v through their short convolutions; windows float32 (states)."""
        windows = windows or [None] * 3
        outs = [
            conv(x, keep=keep, window=w)
            for conv, x, w in zip(self._convs, tensors, windows, strict=True)
        ]
        new_windows = [ops.cast(w, self.state_dtype) for _, w in outs]
        return [o for o, _ in outs], new_windows

    @property
    def state_shapes(self) -> tuple:
        """Shapes of the state tensors without the batch axis: `(kv, k_sum)`
        for `"linear"`, one `(H, D, M)` state for the other recurrences."""
        if self.recurrence != "linear":
            shapes = [(self._num_heads, self._key_dim, self._value_dim)]
            if self.conv_size is not None:
                width = self.conv_size - 1
                dims = (self._key_dim, self._key_dim, self._value_dim)
                shapes += [(width, self._num_heads, d) for d in dims]
            return tuple(shapes)
        return super().state_shapes

    @property
    def state_names(self) -> tuple:
        """`("kv", "k_sum")` for `"linear"`, else `("state",)`, plus the three
        convolution windows with `conv_size`."""
        if self.recurrence == "linear":
            return ("kv", "k_sum")
        windows = ("query_window", "key_window", "value_window") if self.conv_size else ()
        return ("state", *windows)

    def compute_output_shape(self, inputs_shape):
        return super().compute_output_shape(inputs_shape, inputs_shape)

    def compute_output_spec(
        self,
        inputs,
        padding_mask=None,
        initial_state=None,
        return_state=False,
        training=None,
        start_index=0,
    ):
        out = keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=self.compute_dtype)
        if not return_state:
            return out
        batch = inputs.shape[0]
        return out, tuple(
            keras.KerasTensor((batch, *shape), dtype=self.state_dtype)
            for shape in self.state_shapes
        )
