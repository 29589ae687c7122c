"""TFLite/LiteRT conversion of an exported SavedModel, builtin ops only."""

from __future__ import annotations

import tensorflow as tf

QUANTIZATIONS = ("float32", "float16", "int8")


def convert_to_tflite(
    saved_model_dir: str, signature_key: str, quantization: str = "float32"
) -> bytes:
    """Convert one signature of a SavedModel with TFLITE_BUILTINS only (no Flex ops).

    One signature per file: TF 2.21's converter keeps the weights of
    multi-signature models as uninitialised resource variables (measured:
    NaN outputs), so `serve` and `step` go to separate files.

    `quantization`: `"float32"`, `"float16"` (weights stored as float16) or
    `"int8"` (dynamic-range: int8 weights, float activations).

    Example:

    >>> import tempfile
    >>> from keras_linear_attention.export import export_saved_model
    >>> from keras_linear_attention.models import build_sequence_classifier
    >>> path = tempfile.mkdtemp()
    >>> export_saved_model(build_sequence_classifier(3, feature_dim=4, sequence_length=8), path)
    ['serve']
    >>> flatbuffer = convert_to_tflite(path, "serve", "int8")
    >>> flatbuffer[4:8]  # the TFLite file identifier
    b'TFL3'
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"`quantization` must be one of {QUANTIZATIONS}; received {quantization!r}."
        )
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, [signature_key])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def builtin_ops(flatbuffer: bytes) -> list[str]:
    """Sorted names of the operators a TFLite model uses, in every subgraph.

    A model whose length is dynamic holds the short-sequence and chunked
    paths as the two branches (subgraphs) of an `IF`; the interpreter's op
    list shows only the main subgraph, so the flatbuffer's operator codes are
    read instead (a Flex or custom op is `CUSTOM` there).
    """
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = (max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes)
    return sorted({names[code] for code in codes})
