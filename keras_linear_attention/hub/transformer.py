"""keras-hub's `TransformerDecoder` / `TransformerEncoder` with linear attention."""

from __future__ import annotations

import contextlib
from typing import Any

import keras
from keras_hub.layers import TransformerDecoder as HubTransformerDecoder
from keras_hub.layers import TransformerEncoder as HubTransformerEncoder
from keras_hub.src.layers.modeling import transformer_decoder as hub_decoder_module

from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention.hub.attention import LinearCachedMultiHeadAttention
from keras_linear_attention.layers.linear_multi_head_attention import (
    PACKAGE,
    LinearMultiHeadAttention,
)


@contextlib.contextmanager
def _replaced(owner: Any, name: str, factory: Any):
    """`owner.name` is `factory` inside the block.

    keras-hub's blocks create their attention inside `build`, under a fixed
    class name, and Keras never untracks a replaced sublayer; building with
    the name pointing at our class gives the same sublayers, weights and
    weight order as the softmax block, with nothing copied from keras-hub.
    """
    original = getattr(owner, name)
    setattr(owner, name, factory)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _linear(cls: type, feature_map: Any, **options: Any) -> Any:
    def make(**kwargs):
        return cls(feature_map=fm_lib.get(feature_map), **options, **kwargs)

    return make


class _LinearAttentionOptions:
    """φ and the attention options of a keras-hub block made linear, in its config."""

    def _set_attention_options(self, feature_map: Any, eps: Any, chunk_size: Any) -> None:
        self.feature_map = fm_lib.serialize(fm_lib.get(feature_map))
        # Only those given: the attention layer's defaults otherwise.
        given = {"eps": eps, "chunk_size": chunk_size}
        self._attention_options = {k: v for k, v in given.items() if v is not None}

    def _attention_factory(self, cls: type) -> Any:
        return _linear(cls, self.feature_map, **self._attention_options)

    def get_config(self) -> dict:
        return {**super().get_config(), "feature_map": self.feature_map, **self._attention_options}


@keras.saving.register_keras_serializable(package=f"{PACKAGE}.hub")
class TransformerDecoder(_LinearAttentionOptions, HubTransformerDecoder):
    """`keras_hub.layers.TransformerDecoder` with linear attention.

    The arguments, sublayers, weights (in the same order) and masks of
    keras-hub's decoder, plus those of the attention: `feature_map`, `eps`,
    `chunk_size` (see `LinearMultiHeadAttention`). A softmax decoder's
    `get_weights()` loads with `set_weights`.

    For step-by-step decoding, `self_attention_cache` is the recurrent
    state `(kv, k_sum)` of the tokens before `decoder_sequence`
    (`get_initial_state(batch)` for none) and the call returns
    `(outputs, new_state)`: the state has a fixed size, so keras-hub's
    K/V-cache masks (built from the cache length) are not used, and
    `self_attention_cache_update_index` is ignored. Prefill then one-token
    steps give the parallel outputs.

    Example:

    >>> decoder = TransformerDecoder(intermediate_dim=16, num_heads=2)
    >>> x = keras.ops.ones((1, 5, 8))
    >>> decoder(x).shape
    TensorShape([1, 5, 8])
    >>> out, state = decoder(x, self_attention_cache=decoder.get_initial_state(1))
    >>> out.shape, state[0].shape
    (TensorShape([1, 5, 8]), TensorShape([1, 2, 4, 4]))
    """

    def __init__(
        self,
        intermediate_dim: int,
        num_heads: int,
        feature_map: Any = "elu",
        eps: float | None = None,
        chunk_size: int | None = None,
        **kwargs,
    ):
        # keras-hub builds in `__init__` when given the shapes (from a
        # config): build once the attention options are set.
        shapes = (
            kwargs.pop("decoder_sequence_shape", None),
            kwargs.pop("encoder_sequence_shape", None),
        )
        super().__init__(intermediate_dim, num_heads, **kwargs)
        self._set_attention_options(feature_map, eps, chunk_size)
        if shapes[0]:
            self.build(*shapes)

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        factory = self._attention_factory(LinearCachedMultiHeadAttention)
        with _replaced(hub_decoder_module, "CachedMultiHeadAttention", factory):
            super().build(decoder_sequence_shape, encoder_sequence_shape)

    def get_initial_state(self, batch_size: Any) -> tuple:
        """The empty self-attention state `(kv, k_sum)`: pass it as
        `self_attention_cache` for the first call."""
        if not self.built:
            raise ValueError("Call the decoder once (or `build` it) before `get_initial_state`.")
        return self._self_attention_layer.get_initial_state(batch_size)

    def _compute_self_attention_mask(
        self,
        decoder_sequence,
        decoder_padding_mask,
        decoder_attention_mask,
        use_causal_mask,
        self_attention_cache,
        self_attention_cache_update_index,
    ):
        # The state holds the earlier tokens: mask the new ones among themselves.
        return super()._compute_self_attention_mask(
            decoder_sequence,
            decoder_padding_mask,
            decoder_attention_mask,
            use_causal_mask,
            None,
            None,
        )


@keras.saving.register_keras_serializable(package=f"{PACKAGE}.hub")
class TransformerEncoder(_LinearAttentionOptions, HubTransformerEncoder):
    """`keras_hub.layers.TransformerEncoder` with linear attention.

    keras-hub's encoder with `LinearMultiHeadAttention` where it has
    `keras.layers.MultiHeadAttention`: the same arguments, sublayers and
    weight order, plus `feature_map`, `eps` and `chunk_size`.

    Example:

    >>> encoder = TransformerEncoder(intermediate_dim=16, num_heads=2)
    >>> mask = keras.ops.array([[True, True, True, False, False]])
    >>> encoder(keras.ops.ones((1, 5, 8)), padding_mask=mask).shape
    TensorShape([1, 5, 8])
    """

    def __init__(
        self,
        intermediate_dim: int,
        num_heads: int,
        feature_map: Any = "elu",
        eps: float | None = None,
        chunk_size: int | None = None,
        **kwargs,
    ):
        super().__init__(intermediate_dim, num_heads, **kwargs)
        self._set_attention_options(feature_map, eps, chunk_size)

    def build(self, inputs_shape):
        factory = self._attention_factory(LinearMultiHeadAttention)
        with _replaced(keras.layers, "MultiHeadAttention", factory):
            super().build(inputs_shape)
