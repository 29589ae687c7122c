"""One call from a Keras model to SavedModel + TFLite files, checked against Keras."""

from __future__ import annotations

import json
import os

import keras

from keras_linear_attention.export import parity, signatures, tflite
from keras_linear_attention.export.saved_model import export_saved_model


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def export_bundle(
    model: keras.Model,
    out_dir: str,
    quantizations: tuple = tflite.QUANTIZATIONS,
    sample=None,
) -> dict:
    """Export `model` into `out_dir` and check every file against Keras.

    Writes `out_dir/saved_model/` (signatures `serve`, plus `prefill`/`step`
    for causal linear LMs), `out_dir/serve.<quantization>.tflite` (not for
    delta-rule LMs: `summary["tflite_skipped"]` says why) and, for LMs,
    `out_dir/step.<quantization>.tflite`, and `out_dir/summary.json`
    (file sizes, signatures, TFLite operators, max abs error against Keras on
    `sample`, random inputs by default). Returns the summary.

    Example:

    >>> import tempfile
    >>> from keras_linear_attention.models import build_sequence_classifier
    >>> model = build_sequence_classifier(3, feature_dim=4, sequence_length=16)
    >>> summary = export_bundle(model, tempfile.mkdtemp(), ("float32",))
    >>> summary["saved_model"]["signatures"]
    ['serve']
    """
    os.makedirs(out_dir, exist_ok=True)
    sample = parity.sample_inputs(model) if sample is None else sample
    sm_dir = os.path.join(out_dir, "saved_model")
    names = export_saved_model(model, sm_dir)
    summary = {
        "saved_model": {
            "path": sm_dir,
            "bytes": _size(sm_dir),
            "signatures": names,
            "max_abs_error": parity.saved_model_errors(model, sm_dir, sample),
        },
        "tflite": {},
        "tflite_skipped": signatures.tflite_limits(model),
    }
    checks = {"serve": parity.tflite_serve_error, "step": parity.tflite_step_error}
    for key in [n for n in names if n in checks and n not in summary["tflite_skipped"]]:
        for quantization in quantizations:
            flatbuffer = tflite.convert_to_tflite(sm_dir, key, quantization)
            path = os.path.join(out_dir, f"{key}.{quantization}.tflite")
            with open(path, "wb") as f:
                f.write(flatbuffer)
            summary["tflite"][f"{key}.{quantization}"] = {
                "path": path,
                "bytes": len(flatbuffer),
                "ops": tflite.builtin_ops(flatbuffer),
                "max_abs_error": checks[key](model, flatbuffer, sample),
            }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable lines for the command line."""
    sm = summary["saved_model"]
    lines = [
        f"SavedModel {sm['path']}  {sm['bytes'] / 1e6:.2f} MB  signatures: "
        + ", ".join(sm["signatures"]),
        "  max |SavedModel - Keras|: "
        + ", ".join(f"{k} {v:.2e}" for k, v in sm["max_abs_error"].items()),
    ]
    for info in summary["tflite"].values():
        lines.append(
            f"TFLite {info['path']}  {info['bytes'] / 1e6:.2f} MB  "
            f"max |TFLite - Keras| {info['max_abs_error']:.2e}"
        )
    for key, reason in summary.get("tflite_skipped", {}).items():
        lines.append(f"TFLite {key}: not written: {reason}")
    ops = sorted({op for info in summary["tflite"].values() for op in info["ops"]})
    lines.append("TFLite operators (all builtin): " + " ".join(ops))
    return "\n".join(lines)
