"""SavedModel export through `keras.export.ExportArchive`."""

from __future__ import annotations

import keras

from keras_linear_attention.export import signatures


def export_saved_model(model: keras.Model, path: str, verbose: bool = False) -> list[str]:
    """Write a SavedModel with a `serve` signature (dynamic batch and length)
    and, for causal linear language models, `prefill` and `step` signatures
    whose recurrent states are explicit tensors. The result loads with plain
    `tf.saved_model.load` (no import of this package needed).

    Returns the signature names.

    Example:

    >>> import tempfile
    >>> from keras_linear_attention.models import build_sequence_classifier
    >>> model = build_sequence_classifier(3, feature_dim=4, sequence_length=8)
    >>> export_saved_model(model, tempfile.mkdtemp())
    ['serve']
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "SavedModel/TFLite export needs the TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow); the current backend is {keras.backend.backend()!r}."
        )
    archive = keras.export.ExportArchive()
    archive.track(model)
    names = []
    for name, (fn, spec) in signatures.endpoints(model).items():
        archive.add_endpoint(name, fn, input_signature=spec)
        names.append(name)
    archive.write_out(path, verbose=verbose)
    return names
