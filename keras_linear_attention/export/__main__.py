"""`python -m keras_linear_attention.export MODEL.keras`: SavedModel + TFLite + checks."""

from __future__ import annotations

import argparse
import os

import keras
import numpy as np

import keras_linear_attention  # noqa: F401  (registers the layers for loading)
from keras_linear_attention.export import parity, tflite
from keras_linear_attention.export.bundle import export_bundle, format_summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a .keras file")
    parser.add_argument("--out", help="output folder (default saved_models/<model name>)")
    parser.add_argument(
        "--quantize", nargs="+", default=list(tflite.QUANTIZATIONS), choices=tflite.QUANTIZATIONS
    )
    parser.add_argument("--length", type=int, default=16, help="sequence length of the check")
    parser.add_argument("--inputs", help=".npy file of inputs for the parity check")
    args = parser.parse_args(argv)
    model = keras.saving.load_model(args.model)
    name = os.path.splitext(os.path.basename(args.model))[0]
    out = args.out or os.path.join("saved_models", name)
    sample = (
        np.load(args.inputs) if args.inputs else parity.sample_inputs(model, length=args.length)
    )
    print(format_summary(export_bundle(model, out, tuple(args.quantize), sample)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
