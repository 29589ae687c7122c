"""`LinearCachedMultiHeadAttention`: keras-hub's cached-attention interface."""

from __future__ import annotations

import keras

from keras_linear_attention.layers import _masks
from keras_linear_attention.layers.linear_multi_head_attention import (
    PACKAGE,
    LinearMultiHeadAttention,
)
from keras_linear_attention.ops._common import poison_on_failure


@keras.saving.register_keras_serializable(package=f"{PACKAGE}.hub")
class LinearCachedMultiHeadAttention(LinearMultiHeadAttention):
    """`LinearMultiHeadAttention` called the way keras-hub calls its
    `CachedMultiHeadAttention`, with a recurrent state for a cache.

    Without `cache` it is `LinearMultiHeadAttention` (every mask keras-hub
    builds: padding, causal-and-padding `(B, T, T)`). With `cache`, a
    self-attention layer reads the cache as the state `(kv, k_sum)` of the
    tokens before `query` (`get_initial_state(batch)` for none), attends
    causally over it and the new tokens, and returns `(out, new_state)`:
    prefill and one-token steps cost the same whatever the context length.
    `cache_update_index` is not needed as a slot (the state has none): it
    is only the position of `query`'s first token, which rotary position
    embeddings (`rotary_max_wavelength`) need. A cross-attention layer
    (`value` is not `query`) recomputes its attention from `value` and
    returns `cache` unchanged.

    Example:

    >>> layer = LinearCachedMultiHeadAttention(num_heads=2, key_dim=4)
    >>> x = keras.ops.ones((1, 3, 8))
    >>> out, state = layer(x, x, cache=layer.get_initial_state(1))
    >>> out.shape, state[0].shape, state[1].shape
    (TensorShape([1, 3, 8]), TensorShape([1, 2, 4, 4]), TensorShape([1, 2, 4]))
    """

    def call(
        self,
        query,
        value,
        key=None,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        return_attention_scores=False,
        training=None,
        **kwargs,
    ):
        if cache is None:
            return super().call(
                query,
                value,
                key=key,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                **kwargs,
            )
        if return_attention_scores:
            raise ValueError(
                "`return_attention_scores=True` is not available with `cache`: a "
                "recurrent state keeps no attention matrix."
            )
        if value is not query or (key is not None and key is not query):
            out = super().call(
                query, value, key=key, attention_mask=attention_mask, training=training
            )
            return out, cache
        return self._step(query, attention_mask, cache, cache_update_index, training)

    def _step(self, x, attention_mask, state, start_index, training):
        """Causal self-attention over `state` and then `x`."""
        plan = _masks.plan(x, x, self._num_heads, attention_mask=attention_mask, causal=True)
        out, _, state = self._compute_attention(
            x,
            x,
            x,
            plan.keys,
            causal=True,
            training=training,
            initial_state=tuple(state),
            return_state=True,
            start_index=0 if start_index is None else start_index,
        )
        return poison_on_failure(out, plan.validity), state
