"""Export to SavedModel (serving) and TFLite/LiteRT (edge); TensorFlow backend only."""

from keras_linear_attention.export.bundle import export_bundle, format_summary
from keras_linear_attention.export.saved_model import export_saved_model
from keras_linear_attention.export.tflite import builtin_ops, convert_to_tflite

__all__ = [
    "builtin_ops",
    "convert_to_tflite",
    "export_bundle",
    "export_saved_model",
    "format_summary",
]
