"""keras-hub with linear attention (optional: `pip install keras-linear-attention[hub]`).

keras-hub's own blocks, with this package's attention where keras-hub puts
`CachedMultiHeadAttention` / `keras.layers.MultiHeadAttention`: the same
weights in the same order (a softmax block's `get_weights()` loads with
`set_weights`), the masks keras-hub builds, and for decoders a recurrent
state where keras-hub keeps a K/V cache.

Importing this module imports keras-hub; the core package never does.
"""

from keras_linear_attention.hub.attention import LinearCachedMultiHeadAttention
from keras_linear_attention.hub.export import export_causal_lm
from keras_linear_attention.hub.gpt2 import (
    ByteLevelTokenizer,
    LinearGPT2Backbone,
    LinearGPT2CausalLM,
    LinearGPT2CausalLMPreprocessor,
)
from keras_linear_attention.hub.transformer import TransformerDecoder, TransformerEncoder

__all__ = [
    "ByteLevelTokenizer",
    "LinearCachedMultiHeadAttention",
    "LinearGPT2Backbone",
    "LinearGPT2CausalLM",
    "LinearGPT2CausalLMPreprocessor",
    "TransformerDecoder",
    "TransformerEncoder",
    "export_causal_lm",
]
