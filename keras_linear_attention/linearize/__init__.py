"""Turn a trained softmax-attention model into a linear-attention one.

`linearize` swaps every softmax attention layer for linear attention with
the same weights (plus a trainable feature map); `attention_transfer` fits
the new weights so each linear layer reproduces its softmax layer (the
recipe of Hedgehog and LoLCATs, Zhang et al. 2024); a short `fit` finishes.
"""

from keras_linear_attention.linearize.convert import linearize
from keras_linear_attention.linearize.transfer import attention_transfer

__all__ = ["attention_transfer", "linearize"]
