"""LiteRT latency of exported models: per-token `step` and whole-sequence `serve`.

Builds a causal linear LM (and a classifier), exports SavedModel → TFLite
(float32 and dynamic-range int8) with the package's exporter, and times the
`ai-edge-litert` interpreter in this process: `step` latency after contexts
of growing length (it must stay flat: the state has a fixed size), `serve`
latency against sequence length (linear), and file sizes. Single-threaded
interpreter, median of `--repeats`.

    python benchmarks/edge_latency.py [--lengths 64 256 1024 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import median_seconds  # noqa: E402

from keras_linear_attention import build_causal_lm  # noqa: E402
from keras_linear_attention.export import convert_to_tflite, export_saved_model  # noqa: E402
from keras_linear_attention.export.parity import tflite_runner  # noqa: E402
from keras_linear_attention.export.signatures import recurrent_or_none, state_names  # noqa: E402


def step_latency(flatbuffer: bytes, model, contexts, repeats: int) -> dict:
    """ms per `step` call after `context` tokens: states from the Keras prefill."""
    runner = tflite_runner(flatbuffer).get_signature_runner("step")
    lm = recurrent_or_none(model)
    result = {}
    for context in contexts:
        tokens = np.ones((1, context), np.int32)
        _, states = lm.prefill(tokens)
        feed = {k: np.asarray(v) for k, v in zip(state_names(lm), states, strict=True)}
        call = dict(feed, token=np.ones((1,), np.int32), index=np.asarray(context, np.int32))
        result[context] = 1000 * median_seconds(lambda call=call: runner(**call), repeats)
    return result


def serve_latency(flatbuffer: bytes, lengths, repeats: int) -> dict:
    runner = tflite_runner(flatbuffer).get_signature_runner("serve")
    return {
        n: 1000 * median_seconds(lambda n=n: runner(token_ids=np.ones((1, n), np.int32)), repeats)
        for n in lengths
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    keras.utils.set_random_seed(0)
    model = build_causal_lm(
        256,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=4,
        position="sinusoidal",
    )
    sm = tempfile.mkdtemp(prefix="kla_edge_")
    export_saved_model(model, sm)
    results = {"model": vars(args), "tflite": {}}
    for quantization in ("float32", "int8"):
        step_fb = convert_to_tflite(sm, "step", quantization)
        serve_fb = convert_to_tflite(sm, "serve", quantization)
        row = {
            "step_bytes": len(step_fb),
            "serve_bytes": len(serve_fb),
            "step_ms_after_context": step_latency(step_fb, model, args.lengths, args.repeats),
            "serve_ms_by_length": serve_latency(serve_fb, args.lengths, max(3, args.repeats // 5)),
        }
        results["tflite"][quantization] = row
        steps = row["step_ms_after_context"]
        first, last = steps[args.lengths[0]], steps[args.lengths[-1]]
        print(
            f"{quantization}: step.tflite {len(step_fb) / 1e6:.2f} MB, "
            f"serve.tflite {len(serve_fb) / 1e6:.2f} MB"
        )
        for n in args.lengths:
            serve = row["serve_ms_by_length"][n]
            print(f"  N={n:>6}  step {steps[n]:7.3f} ms/token   serve {serve:9.2f} ms")
        print(
            f"  step latency at N={args.lengths[-1]} / at N={args.lengths[0]}: {last / first:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
