"""What `linearize` and `attention_transfer` share: finding attention layers
and telling a linear layer's weights from those it kept from softmax."""

from __future__ import annotations

import inspect
from typing import Any

import keras

from keras_linear_attention.layers import LinearMultiHeadAttention

MHA = keras.layers.MultiHeadAttention
MHA_CALL = inspect.signature(MHA.call)


def is_softmax_attention(layer: Any) -> bool:
    """A Keras `MultiHeadAttention` (or subclass) that is not this package's."""
    return isinstance(layer, MHA) and not isinstance(layer, LinearMultiHeadAttention)


def projection_weights(layer: LinearMultiHeadAttention) -> list:
    """The weights a linear attention layer shares with Keras `MultiHeadAttention`."""
    denses = [layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense]
    if layer.get_config().get("use_gate"):
        denses.append(layer._gate_dense)
    return [w for dense in denses for w in dense.weights]


def new_weights(layer: LinearMultiHeadAttention) -> list:
    """A linear attention layer's weights that softmax attention does not have."""
    kept = {id(w) for w in projection_weights(layer)}
    return [w for w in layer.weights if id(w) not in kept]


def new_weight_ids(layers: list) -> set[int]:
    """Ids of the new weights of every linear attention layer in `layers`."""
    ids = set()
    for top in layers:
        for layer in top._flatten_layers(include_self=True):
            if isinstance(layer, LinearMultiHeadAttention):
                ids.update(id(w) for w in new_weights(layer))
    return ids


def attention_layers(model: keras.layers.Layer) -> list[tuple[str, keras.layers.Layer]]:
    """`(path, layer)` for every attention layer (softmax or linear), depth first;
    paths are layer names from `model` down, joined by "/"."""
    found = []

    def walk(layer, prefix):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            path = f"{prefix}{child.name}"
            if isinstance(child, MHA):
                found.append((path, child))
            walk(child, path + "/")

    walk(model, "")
    return found
