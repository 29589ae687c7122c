"""GPT-2's architecture with linear attention, as a keras-hub `CausalLM`.

`LinearGPT2Backbone` is keras-hub's `GPT2Backbone` with
`kla.hub.TransformerDecoder` blocks (same config, layers and weight order:
a softmax GPT-2's weights load). `LinearGPT2CausalLM` carries each block's
recurrent state `(kv, k_sum)` through keras-hub's samplers where GPT-2 keeps
a K/V cache, so `generate` costs the same per token at any context length.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
from keras import ops
from keras_hub.models import CausalLMPreprocessor, GPT2Backbone, GPT2CausalLM
from keras_hub.src.models.gpt2 import gpt2_backbone as hub_gpt2_backbone_module
from keras_hub.src.utils.tensor_utils import any_equal
from keras_hub.tokenizers import ByteTokenizer

from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention.hub.transformer import TransformerDecoder, _replaced
from keras_linear_attention.layers.linear_multi_head_attention import PACKAGE


@keras.saving.register_keras_serializable(package=f"{PACKAGE}.hub")
class LinearGPT2Backbone(GPT2Backbone):
    """keras-hub's `GPT2Backbone` with linear attention.

    Args: those of `keras_hub.models.GPT2Backbone`, and `feature_map` (φ of
    every block's attention, see `LinearMultiHeadAttention`).

    Example:

    >>> backbone = LinearGPT2Backbone(
    ...     vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=32)
    >>> ids = keras.ops.ones((1, 6), "int32")
    >>> backbone({"token_ids": ids, "padding_mask": keras.ops.ones_like(ids)}).shape
    TensorShape([1, 6, 8])
    """

    def __init__(self, *args: Any, feature_map: Any = "elu", **kwargs: Any):
        feature_map = fm_lib.serialize(fm_lib.get(feature_map))
        block = functools.partial(TransformerDecoder, feature_map=feature_map)
        with _replaced(hub_gpt2_backbone_module, "TransformerDecoder", block):
            super().__init__(*args, **kwargs)
        self.feature_map = feature_map

    def get_config(self) -> dict:
        return {**super().get_config(), "feature_map": self.feature_map}


@keras.saving.register_keras_serializable(package=f"{PACKAGE}.hub")
class ByteLevelTokenizer(ByteTokenizer):
    """keras-hub's `ByteTokenizer` (256 ids, no vocabulary file) with the
    start, end and padding ids a `CausalLMPreprocessor` needs: the ASCII
    control bytes STX (2), ETX (3) and NUL (0). Case is kept by default.

    Example:

    >>> tokenizer = ByteLevelTokenizer()
    >>> tokenizer("Hi").tolist(), sorted(tokenizer.special_token_ids)
    ([72, 105], [0, 2, 3])
    """

    def __init__(self, lowercase: bool = False, **kwargs: Any):
        super().__init__(lowercase=lowercase, **kwargs)
        for name, byte in (("start_token", 2), ("end_token", 3), ("pad_token", 0)):
            self._add_special_token(chr(byte), name)
            setattr(self, f"{name}_id", byte)

    def save_assets(self, dir_path: str) -> None:
        """Nothing to save (bytes need no vocabulary file); for keras-hub presets."""

    def load_preset_assets(self, preset: str) -> None:
        """Nothing to load (see `save_assets`)."""


@keras.saving.register_keras_serializable(package=f"{PACKAGE}.hub")
class LinearGPT2CausalLMPreprocessor(CausalLMPreprocessor):
    """keras-hub's `CausalLMPreprocessor` for `LinearGPT2CausalLM` over
    bytes: `LinearGPT2CausalLMPreprocessor(ByteLevelTokenizer(), sequence_length=256)`
    (use a backbone with `vocabulary_size=256`)."""

    backbone_cls = LinearGPT2Backbone
    tokenizer_cls = ByteLevelTokenizer


@keras.saving.register_keras_serializable(package=f"{PACKAGE}.hub")
class LinearGPT2CausalLM(GPT2CausalLM):
    """keras-hub's `GPT2CausalLM` over a `LinearGPT2Backbone`: `fit`,
    `compile(sampler=...)` and `generate` as in keras-hub, with a recurrent
    state for a cache.

    The cache is a tuple of per-block states. Before sampling, the prompt is
    read in parallel up to the shortest prompt's last token; keras-hub's
    samplers then feed that token and every later one, one at a time (rows
    with longer prompts keep their own tokens), so each token enters the
    state exactly once and ragged prompts give what each prompt gives alone.
    The `hidden_states` handed to samplers are those of the parallel pass
    (samplers other than contrastive search do not read them).

    Example:

    >>> backbone = LinearGPT2Backbone(
    ...     vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8,
    ...     intermediate_dim=16, max_sequence_length=32)
    >>> lm = LinearGPT2CausalLM(backbone)
    >>> lm.compile(sampler="greedy")
    >>> ids = keras.ops.convert_to_tensor([[5, 6, 7, 0, 0, 0]], "int32")
    >>> mask = keras.ops.convert_to_tensor([[1, 1, 1, 0, 0, 0]], "bool")
    >>> out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    >>> out["token_ids"].shape, out["token_ids"][0, :3].tolist()
    ((1, 6), [5, 6, 7])
    """

    backbone_cls = LinearGPT2Backbone
    preprocessor_cls = LinearGPT2CausalLMPreprocessor

    def get_initial_state(self, batch_size: Any) -> tuple:
        """One empty state `(kv, k_sum)` per block."""
        return tuple(block.get_initial_state(batch_size) for block in self._blocks)

    @property
    def _blocks(self) -> list:
        return self.backbone.transformer_layers

    def call_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None):
        """Logits, hidden states and new states for `token_ids` at positions
        `cache_update_index + [0, T)`, after the tokens `cache` holds.
        Positions where `padding_mask` is False are left out of the state."""
        backbone = self.backbone
        tokens = backbone.token_embedding(token_ids)
        positions = backbone.position_embedding(tokens, start_index=cache_update_index)
        x = backbone.embeddings_dropout(backbone.embeddings_add((tokens, positions)))
        states = []
        for block, state in zip(self._blocks, cache, strict=True):
            x, state = block(x, decoder_padding_mask=padding_mask, self_attention_cache=state)
            states.append(state)
        hidden_states = backbone.layer_norm(x)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, tuple(states)

    def _build_cache(self, token_ids, index):
        """The state after positions `[0, index - 1)`: the first token the
        sampler feeds is the one at `index - 1`."""
        length = ops.shape(token_ids)[1]
        before = ops.arange(length)[None, :] < index - 1
        before = ops.broadcast_to(before, ops.shape(token_ids))
        initial = self.get_initial_state(ops.shape(token_ids)[0])
        _, hidden_states, cache = self.call_with_cache(token_ids, initial, 0, before)
        return hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """keras-hub's GPT-2 `generate_step` with the state cache."""
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))
        hidden_states, cache = self._build_cache(token_ids, index)

        def next(prompt, cache, index):
            batch_size = ops.shape(prompt)[0]
            token = ops.slice(prompt, [0, index - 1], [batch_size, 1])
            logits, hidden, cache = self.call_with_cache(token, cache, index - 1)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        return {
            "token_ids": token_ids,
            "padding_mask": _generated_mask(token_ids, padding_mask, stop_token_ids),
        }


def _generated_mask(token_ids, prompt_mask, stop_token_ids):
    """True up to and including each row's first generated stop token."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    end = ops.cast(any_equal(token_ids, stop_token_ids, ops.logical_not(prompt_mask)), "int32")
    overflow = ops.cast(ops.cumsum(end, axis=-1), "int32") - end
    return ops.logical_not(ops.cast(overflow, "bool"))
