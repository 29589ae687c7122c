"""Load weights saved from a `keras.layers.MultiHeadAttention` model.

Keras files key each layer of a functional model by its class name
(`multi_head_attention`, `multi_head_attention_1`, ...), so a model whose
MHA layers were swapped for `LinearMultiHeadAttention` cannot read them
with `load_weights` alone. The weights themselves are identical.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile

import h5py
import keras

_MHA_GROUP = re.compile(r"^multi_head_attention(_\d+)?$")


def load_mha_weights(model: keras.Model, filepath: str, skip_mismatch: bool = False) -> None:
    """Load a `.weights.h5` or `.keras` file saved by the MHA version of `model`.

    `model` must be the same architecture with every
    `keras.layers.MultiHeadAttention` replaced by `LinearMultiHeadAttention`
    (layers held as attributes of custom layers load with plain
    `load_weights` already).

    Example:

    ```python
    mha_model.save_weights("mha.weights.h5")
    load_mha_weights(linear_model, "mha.weights.h5")
    ```
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = _weights_file(filepath, tmp)
        renamed = os.path.join(tmp, "renamed.weights.h5")
        with h5py.File(source, "r") as fin, h5py.File(renamed, "w") as fout:
            for key in fin:
                fin.copy(fin[key], fout, name=key)
            _rename_mha_groups(fout)
        model.load_weights(renamed, skip_mismatch=skip_mismatch)


def _weights_file(filepath: str, tmp: str) -> str:
    if str(filepath).endswith(".keras"):
        with zipfile.ZipFile(filepath) as archive:
            return archive.extract("model.weights.h5", tmp)
    if not str(filepath).endswith(".weights.h5"):
        raise ValueError(f"`filepath` must end in .weights.h5 or .keras; received {filepath!r}.")
    return filepath


def _rename_mha_groups(group: h5py.Group) -> None:
    for name in list(group.keys()):
        child = group[name]
        if not isinstance(child, h5py.Group):
            continue
        _rename_mha_groups(child)
        if _MHA_GROUP.match(name):
            group.move(name, "linear_" + name)
