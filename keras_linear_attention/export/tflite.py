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

    >>> flatbuffer = convert_to_tflite("/tmp/kla_doctest_sm", "serve")  # doctest: +SKIP
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
    """Sorted names of the operators a TFLite model uses."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})
