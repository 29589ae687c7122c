"""The speed and memory suite: layers and core math against softmax attention.

Every configuration runs in a fresh process (`bench_config.py`), so its peak
memory is its own; softmax lengths that exhaust the memory cap are recorded
as "out of memory", and longer ones are then skipped. Writes `suite.json`
(results + machine description), the figures and the target table
(`figures.py`, `targets.py`) into `--out`.

    python benchmarks/suite.py                  # full suite (about 42 min)
    python benchmarks/suite.py --quick --jit off --out /tmp/bench   # 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import _process
import figures
import targets

HERE = Path(__file__).resolve().parent
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
LAYER_IMPLS = [
    "keras_mha_causal",
    "keras_mha",
    "linear_causal",
    "linear",
    "causal_layer",
    "projections",
]
# CausalLinearAttention with each other recurrence (issue 16): layer rows
# without XLA (the Keras default on CPU), and one pair against "linear".
RECURRENCE_IMPLS = ["retention_layer", "gated_layer", "delta_layer", "gated_delta_layer"]
# The paper's own PyTorch kernel, beside ours; no XLA there.
BASELINE_IMPLS = ["fast_transformers_causal"]
CORE_IMPLS = ["softmax_causal", "causal", "noncausal"]
SWEEP_CHUNKS = [16, 32, 64, 128, 256]
# The targets that are ratios of two layers are also timed in alternation in
# one process (the baseline first): separate processes differ by up to 30%.
PAIRS = [
    (("keras_mha_causal", "linear_causal", "causal_layer"), 512),
    (("linear", "linear_causal", "causal_layer"), 4096),
    (("linear", "linear_causal", "causal_layer"), 16384),
    (("projections", "linear"), 16384),
    (("causal_layer", *RECURRENCE_IMPLS), 4096),
]
# Peak memory at the longest N depends on how TF's executor happens to
# overlap the backward pass (measured spread about ±150 MiB), so the memory
# target's configurations run in this many fresh processes.
MEMORY_PROCESSES = 3


def configurations(
    lengths: list,
    sweep_lengths: list,
    fit_length: int,
    jits=(False, True),
    chunks=SWEEP_CHUNKS,
    memory_processes: int = MEMORY_PROCESSES,
) -> list:
    """Every configuration, grouped so a failed softmax length skips longer ones."""
    configs = []
    for jit in jits:
        for impl in LAYER_IMPLS + ([] if jit else BASELINE_IMPLS + RECURRENCE_IMPLS):
            for n in lengths:
                cfg = {"kind": "layer", "impl": impl, "n": n, "jit": jit}
                if impl in ("linear_causal", "causal_layer") and n == max(lengths):
                    cfg["processes"] = memory_processes
                configs.append(cfg)
        for impl in CORE_IMPLS:
            configs += [{"kind": "core", "impl": impl, "n": n, "jit": jit} for n in lengths]
        for n in sweep_lengths:
            configs += [
                {"kind": "core", "impl": "causal", "n": n, "jit": jit, "chunk": c, "sweep": True}
                for c in chunks
            ]
        pairs = {(impls, min(n, max(lengths))) for impls, n in PAIRS}
        configs += [
            {"kind": "pair", "impls": list(impls), "n": n, "jit": jit}
            for impls, n in sorted(pairs, key=lambda p: (p[1], p[0]))
        ]
        configs.append({"kind": "fit", "n": fit_length, "jit": jit})
    return configs


def run_repeated(cfg: dict, timeout: float) -> dict:
    """The median-time result of `cfg["processes"]` fresh processes, with
    every process's peak memory (`peak_rss_mib_runs`)."""
    if cfg.get("processes", 1) == 1:
        return run_one(cfg, timeout)
    runs = [run_one(cfg, timeout) for _ in range(cfg["processes"])]
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["fwdbwd"]["seconds"])
    if len(ok) < len(runs):
        return next(r for r in runs if r["status"] != "ok")
    result = ok[len(ok) // 2]
    result["peak_rss_mib_runs"] = [r["fwdbwd"]["peak_rss_mib"] for r in runs]
    result["fwdbwd_seconds_runs"] = [r["fwdbwd"]["seconds"] for r in runs]
    return result


def run_one(cfg: dict, timeout: float) -> dict:
    """Run one configuration in a fresh process; its failure is a result."""
    script = (
        "bench_fast_transformers.py" if cfg.get("impl") in BASELINE_IMPLS else "bench_config.py"
    )
    return _process.run([sys.executable, str(HERE / script), json.dumps(cfg)], cfg, timeout)


def _series(cfg: dict) -> tuple:
    impl = cfg.get("impl") or tuple(cfg.get("impls", ()))
    return cfg["kind"], impl, cfg["jit"], cfg.get("chunk"), cfg.get("sweep", False)


def run_all(configs: list, common: dict, timeout: float) -> list:
    results, failed = [], set()
    for cfg in configs:
        cfg = {**cfg, **common}
        if _series(cfg) in failed:
            result = {**cfg, "status": "skipped: a shorter length already failed"}
        else:
            started = time.perf_counter()
            result = run_repeated(cfg, timeout)
            result["process_seconds"] = time.perf_counter() - started
        if result["status"] != "ok":
            failed.add(_series(cfg))
        results.append(result)
        print(_describe(result), flush=True)
    return results


def _describe(r: dict) -> str:
    impl = "/".join(r["impls"]) if "impls" in r else r.get("impl", "lm")
    name = f"{r['kind']:5s} {impl:16s} N={r['n']:>6} jit={int(r['jit'])}"
    if r.get("chunk"):
        name += f" C={r['chunk']}"
    if r["status"] != "ok":
        return f"{name}  {r['status']}"
    if r["kind"] == "pair":
        ratios = r["fwdbwd"]["ratio_to_first"]
        return f"{name}  " + "  ".join(f"{k} {v:.3f}×" for k, v in list(ratios.items())[1:])
    times = "  ".join(f"{m} {r[m]['seconds'] * 1e3:9.1f} ms" for m in ("fwd", "fwdbwd") if m in r)
    if "seconds" in r:
        times = f"step {r['seconds'] * 1e3:9.1f} ms"
    return f"{name}  {times}  peak {r['peak_rss_mib']:7.0f} MiB"


def machine() -> dict:
    import keras
    import tensorflow as tf

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if "MemTotal" in line)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "platform": platform.platform(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="folder for JSON and PNGs")
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--sweep-lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--fit-length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=20, help="seconds of timed runs per config")
    p.add_argument("--timeout", type=float, default=300, help="seconds per process")
    p.add_argument("--memory-limit", type=float, default=16, help="GiB per process")
    p.add_argument("--jit", choices=["both", "off", "on"], default="both", help="XLA or not")
    p.add_argument("--quick", action="store_true", help="N = 128, one repeat (a smoke test)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="run only the recurrence rows and merge them into the --out folder's suite.json",
    )
    args = p.parse_args(argv)
    chunks, processes = SWEEP_CHUNKS, MEMORY_PROCESSES
    if args.quick:
        args.lengths, args.sweep_lengths, args.fit_length = [128], [128], 64
        args.repeats, args.budget, chunks, processes = 1, 0, [32, 64], 1
    jits = {"both": (False, True), "off": (False,), "on": (True,)}[args.jit]
    common = {
        "repeats": args.repeats,
        "budget_s": args.budget,
        "memory_limit_gib": args.memory_limit,
    }
    configs = configurations(
        args.lengths, args.sweep_lengths, args.fit_length, jits, chunks, processes
    )
    out = Path(args.out)
    if args.merge:
        configs = [c for c in configs if _is_recurrence_row(c)]
    started = time.time()
    report = {
        "machine": machine(),
        "args": vars(args),
        "results": run_all(configs, common, args.timeout),
        "suite_seconds": time.time() - started,
    }
    if args.merge:
        report = _merged(json.loads((out / "suite.json").read_text()), report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(report, indent=1))
    figures.plot_all(report, out)
    table = targets.table(report)
    (out / "targets.md").write_text(table)
    print(table)
    return report


def _is_recurrence_row(cfg: dict) -> bool:
    impls = [cfg["impl"]] if "impl" in cfg else cfg.get("impls", [])
    return any(impl in RECURRENCE_IMPLS for impl in impls)


def _merged(report: dict, rows: dict) -> dict:
    """`report` with its recurrence rows replaced by those of `rows` (a
    `--merge` run on the same machine kind), recorded under `merged_runs`."""
    kept = [r for r in report["results"] if not _is_recurrence_row(r)]
    merged = {k: v for k, v in rows.items() if k != "results"}
    return {
        **report,
        "results": kept + rows["results"],
        "merged_runs": [*report.get("merged_runs", []), merged],
    }


sys.path.insert(0, str(HERE))  # figures.py and targets.py live beside this file

if __name__ == "__main__":
    main()
