"""Whole-model training throughput: tokens/s of `fit` steps of a causal LM.

    python benchmarks/training_throughput.py                      # full run
    python benchmarks/training_throughput.py --quick --out /tmp/t.json   # CI smoke

A 4-block, width-256 (4 heads of 64, feed-forward 1024) causal language model
over 256 token ids at B = 8 and N in {512, 2048, 8192}, float32, trained
with Adam on random ids (throughput does not depend on the data). One
timed call is one `train_on_batch`, the step `fit` runs, in Keras's CPU
default (graph mode, no XLA) or with `--jit on`. Models:

- `keras_mha`: `build_causal_lm(attention="softmax")`, Keras MHA (baseline);
- `ours`: `build_causal_lm()`, `LinearMultiHeadAttention` inside this
  package's blocks;
- `hub_softmax`: keras-hub's `TransformerDecoder` stack (its embeddings,
  its masks, `CachedMultiHeadAttention`);
- `hub_linear`: the same stack with `kla.hub.TransformerDecoder`;
- `no_mixing`: `keras_mha` with the attention's token mixing taken out (the
  projected q + k + v go straight to the output projection): a bound, not a
  model. Its "x/MHA" is the most any attention in these blocks could gain
  over softmax, the projections and feed-forward being the same.

All models of one length are timed in alternation in one process
(`_timing.interleaved`), so machine noise hits them alike; "x/MHA" is
tokens/s over Keras MHA's (above 1, x is faster). A model whose step would
exceed `--max-seconds` (estimated from the previous length, attention
growing as N² for softmax) is left out of the alternation and tried once
instead, in a fresh process under a memory cap (`--probe-gib`, 16 GiB as in
the suite), with the first timed model beside it for reference: "out of
memory", or one step's time and peak memory. `--quick`
shrinks every size; its numbers mean nothing. Under `KERAS_BACKEND=jax` the
steps are XLA-compiled (JAX's `fit`) and the report goes to
`training_throughput_jax.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _process  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import interleaved  # noqa: E402
from training_shapes import JAX, SUFFIX, machine  # noqa: E402

import keras_linear_attention as kla  # noqa: E402

HERE = Path(__file__).resolve().parent
IMPLS = ["keras_mha", "ours", "hub_softmax", "hub_linear", "no_mixing"]
FULL = dict(batch=8, hidden_dim=256, num_layers=4, num_heads=4, vocabulary_size=256)
QUICK = dict(batch=2, hidden_dim=16, num_layers=2, num_heads=2, vocabulary_size=32)
LENGTHS = [512, 2048, 8192]
QUADRATIC = ("keras_mha", "hub_softmax")


def hub_lm(linear: bool, n: int, shapes: dict) -> keras.Model:
    """keras-hub's decoder stack as GPT-2 builds it, softmax or linear."""
    import keras_hub

    from keras_linear_attention import hub

    block = hub.TransformerDecoder if linear else keras_hub.layers.TransformerDecoder
    d = shapes["hidden_dim"]
    tokens = keras.Input((n,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(shapes["vocabulary_size"], n, d)(tokens)
    for _ in range(shapes["num_layers"]):
        x = block(intermediate_dim=4 * d, num_heads=shapes["num_heads"], normalize_first=True)(x)
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(tokens, keras.layers.Dense(shapes["vocabulary_size"])(x))


def build(impl: str, n: int, shapes: dict) -> keras.Model:
    if impl.startswith("hub_"):
        return hub_lm(impl == "hub_linear", n, shapes)
    model = kla.build_causal_lm(
        shapes["vocabulary_size"],
        sequence_length=n,
        hidden_dim=shapes["hidden_dim"],
        num_layers=shapes["num_layers"],
        num_heads=shapes["num_heads"],
        attention="linear" if impl == "ours" else "softmax",
    )
    if impl == "no_mixing":
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.MultiHeadAttention):
                layer._compute_attention = _without_mixing
    return model


def _without_mixing(query, key, value, *args, **kwargs):
    """Keras MHA's `_compute_attention` with no token mixing: every
    projection is used, no position sees another."""
    return query + key + value, None


def train_step(impl: str, n: int, jit: bool, shapes: dict):
    """A call that runs one `fit` step of a fresh model and waits for it."""
    keras.utils.set_random_seed(0)
    model = build(impl, n, shapes)
    model.compile(
        keras.optimizers.Adam(1e-4),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    ids = np.random.default_rng(0).integers(0, shapes["vocabulary_size"], (shapes["batch"], n + 1))
    x, y = ids[:, :-1].astype("int32"), ids[:, 1:].astype("int32")
    return lambda: float(model.train_on_batch(x, y))


def measure(args, shapes: dict) -> list[dict]:
    rows, last = [], {}
    for n in args.lengths:
        impls = [i for i in args.impls if _fits(i, n, last, args.max_seconds)]
        skipped = [i for i in args.impls if i not in impls]
        fns = {i: train_step(i, n, args.jit, shapes) for i in impls}
        timing = (
            interleaved(fns, rounds=args.rounds, budget_s=args.budget_s)
            if fns
            else {"seconds": {}, "ratio_to_first": {}, "rounds": 0}
        )
        tokens = shapes["batch"] * n
        row = {
            "n": n,
            "ms_per_step": {i: 1e3 * s for i, s in timing["seconds"].items()},
            "tokens_per_s": {i: tokens / s for i, s in timing["seconds"].items()},
            "skipped": skipped,
            "rounds": timing["rounds"],
        }
        if skipped and args.probe_gib > 0:
            del fns  # the probes get the memory the timed models held
            keras.backend.clear_session(free_memory=True)
            row["probes"] = {i: probe_in_subprocess(i, n, args) for i in [*skipped, *impls[:1]]}
        if impls and impls[0] == "keras_mha":
            row["over_mha"] = {i: 1 / r for i, r in timing["ratio_to_first"].items()}
        last = {i: (n, s) for i, s in timing["seconds"].items()}
        rows.append(row)
        _print_row(row, args.impls)
    return rows


def probe(impl: str, n: int, jit: bool, shapes: dict) -> dict:
    """One warm-up and one timed `fit` step in this process, and its peak
    memory (run by `probe_in_subprocess`, under a memory cap)."""
    step = train_step(impl, n, jit, shapes)
    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {
        "status": "ok",
        "seconds": seconds,
        "warmup_seconds": warmup,
        "tokens_per_s": shapes["batch"] * n / seconds,
        "peak_rss_mib": _process.peak_rss_mib(),
    }


def probe_in_subprocess(impl: str, n: int, args) -> dict:
    """A model the time estimate skipped, tried once in a fresh process under
    `--probe-gib` of address space: does it train at all, and how fast."""
    cmd = [sys.executable, __file__, "--probe", impl, str(n), "--probe-gib", str(args.probe_gib)]
    cmd += ["--jit", "on" if args.jit else "off"] + (["--quick"] if args.quick else [])
    result = _process.run(cmd, {"status": ""}, args.probe_timeout)
    if "ResourceExhausted" in result["status"] or "bad_alloc" in result["status"]:
        result["status"] = f"out of memory ({args.probe_gib:g} GiB cap)"
    print(f"  probe {impl} at N = {n}: {result['status']} {result.get('seconds', '')}", flush=True)
    return {**result, "memory_cap_gib": args.probe_gib}


def _fits(impl: str, n: int, last: dict, max_seconds: float) -> bool:
    if impl not in last or max_seconds <= 0:
        return True
    prev_n, seconds = last[impl]
    growth = (n / prev_n) ** (2 if impl in QUADRATIC else 1)
    return seconds * growth <= max_seconds


def _print_row(row: dict, impls: list[str]) -> None:
    cells = []
    for i in impls:
        tps = row["tokens_per_s"].get(i)
        ratio = row.get("over_mha", {}).get(i)
        probe = row.get("probes", {}).get(i)
        if tps is not None:
            cells.append(f"{tps:9.0f}" + (f" ({ratio:.2f})" if ratio else ""))
        elif probe is None:
            cells.append("skipped")
        elif probe["status"] == "ok":
            cells.append(f"{probe['tokens_per_s']:9.0f} (1 step)")
        else:
            cells.append(probe["status"][:16])
    print(f"{row['n']:>6}  " + "  ".join(f"{c:>16}" for c in cells), flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--jit", choices=["off", "on"], default="off")
    p.add_argument("--rounds", type=int, default=5, help="rounds per length (>= 3)")
    p.add_argument("--budget-s", type=float, default=60.0, help="time per length")
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="skip a model whose step would take longer"
    )
    p.add_argument(
        "--probe-gib",
        type=float,
        default=16.0,
        help="try each skipped model once, in a process with this memory cap (0: do not)",
    )
    p.add_argument("--probe-timeout", type=float, default=900.0)
    p.add_argument("--probe", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / f"training_throughput{SUFFIX}.json"))
    args = p.parse_args(argv)
    args.jit = args.jit == "on" or JAX  # JAX without jit dispatches every op eagerly
    shapes = QUICK if args.quick else FULL
    if args.probe:
        _process.limit_memory(args.probe_gib)
        result = probe(args.probe[0], int(args.probe[1]), args.jit, shapes)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    if args.lengths is None:
        args.lengths = [16, 32] if args.quick else LENGTHS
    if args.quick:
        args.rounds, args.budget_s = 1, 0.0
    print(
        f"tokens/s of fit steps (x/MHA), B={shapes['batch']}, width {shapes['hidden_dim']}, "
        f"{shapes['num_layers']} blocks, {'JAX' if JAX else 'XLA' if args.jit else 'graph mode'}",
        flush=True,
    )
    print(f"{'N':>6}  " + "  ".join(f"{i:>16}" for i in args.impls), flush=True)
    start = time.perf_counter()
    rows = measure(args, shapes)
    report = {
        "machine": machine(),
        "shapes": shapes,
        "jit": args.jit,
        "impls": args.impls,
        "results": rows,
        "seconds": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
