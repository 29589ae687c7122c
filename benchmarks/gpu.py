"""Causal attention on a CUDA GPU under JAX: ours against softmax (XLA and
cuDNN), Keras MHA and flash-linear-attention's Triton kernels (issue 20, item 4).

Here, on CPU (the smoke test; its numbers mean nothing):

    python benchmarks/gpu.py --quick --out /tmp/gpu.json

On the device machine (JAX with CUDA, PyTorch and Triton; no Keras, no
TensorFlow, no network), first fetch the wheels here, once:

    bash benchmarks/gpu_bundle.sh     # -> build/gpu_wheels/ (ignored: build/)

then call the device tool's `run` with carry ["build/gpu_wheels"],
timeout_s 480 and (one line; `gpu_bundle.sh` prints it)

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site build/gpu_wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD \
      KERAS_BACKEND=jax PYTHONUNBUFFERED=1 || exit; nvidia-smi;
    python3 benchmarks/gpu.py --max-seconds 300 --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

and copy the returned gpu.json to benchmarks/results/gpu.json. Compiling
dominates (every implementation, mode and dtype is compiled per N), so the
whole default grid does not fit one slot: rows run coarse lengths first
(`plan`), no row starts after `--max-seconds`, and the JSON is rewritten
after every row, so a run cut short keeps what it did ("complete": false).

Per (dtype, N, mode), B = 1, 8 heads of 64 (layers: model dim 512), every
implementation below is compiled, warmed up and then timed in alternation
in one process (`--rounds` rounds, at most `--budget-s` per row after the
first three); each timed call runs the function `reps` times (enough for
`--min-call-s`) and waits for the device once. "fwd" is the output alone,
"fwdbwd" the gradient of `sum(out)` w.r.t. every input (`jax.grad`,
`torch.autograd.grad`; layers: inputs and weights).

- `jax_sdpa`: `jax.nn.dot_product_attention(is_causal=True,
  implementation=None)` (XLA's softmax attention; the baseline of the ratios);
- `jax_sdpa_cudnn`: the same with `implementation="cudnn"` (flash attention;
  bf16/fp16 only, CUDA only: failures are recorded);
- `ours_causal`: `ops.causal_linear_attention(elu+1(q), elu+1(k), v)`;
- `fla_linear_attn`: fla's `chunk_linear_attn(elu+1(q), elu+1(k), v,
  scale=1, normalize=True)` (the same normalised recurrence);
- `ours_gla` / `fla_simple_gla`: `ops.gated_linear_attention` /
  `chunk_simple_gla` with a per-token, per-head log-gate `log σ(g)`;
- `ours_delta` / `fla_delta_rule`: `ops.delta_rule_attention` /
  `chunk_delta_rule` with L2-normalised keys and `β = σ(b)` (fla's kernel
  refuses float32);
- `layer_keras_mha` / `layer_ours`: `keras.layers.MultiHeadAttention` /
  `LinearMultiHeadAttention`, `use_causal_mask=True`, via `stateless_call`
  under `jax.jit`.

fla rows run through PyTorch on CUDA; where PyTorch sees no GPU or fla does
not import they say "unavailable: <why>". Ratios: `over[base][impl]` is the
median over rounds of base's time over impl's (above 1: impl is faster), for
`jax_sdpa`, `jax_sdpa_cudnn` and each ours-vs-counterpart pair. Memory:
XLA's `memory_analysis()` of each compiled function (its peak; a per-function
figure), PyTorch's `max_memory_allocated` over one call, and the process's
JAX peak (`memory_stats()`) after each row. A configuration whose estimated
memory exceeds the device's, or whose time extrapolated from a shorter N
exceeds `--max-call-s`, is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"
# Let PyTorch (fla) share the GPU with JAX: JAX grows its pool as needed.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_linear_attention as kla  # noqa: E402
from keras_linear_attention.feature_maps import elu_plus_one  # noqa: E402

HERE = Path(__file__).resolve().parent
LENGTHS = [2**p for p in range(9, 17)]
DTYPES = ["bfloat16", "float32"]
MODES = ["fwdbwd", "fwd"]
IMPLS = [
    "jax_sdpa",
    "jax_sdpa_cudnn",
    "ours_causal",
    "fla_linear_attn",
    "ours_gla",
    "fla_simple_gla",
    "ours_delta",
    "fla_delta_rule",
    "layer_keras_mha",
    "layer_ours",
]
BASELINES = ["jax_sdpa", "jax_sdpa_cudnn"]
PAIRS = {
    "ours_causal": "fla_linear_attn",
    "ours_gla": "fla_simple_gla",
    "ours_delta": "fla_delta_rule",
    "layer_ours": "layer_keras_mha",
}
# Whose time and memory grow as N² (softmax without a fused kernel).
QUADRATIC_MEMORY = {"jax_sdpa", "layer_keras_mha"}
QUADRATIC_TIME = {"jax_sdpa", "jax_sdpa_cudnn", "layer_keras_mha"}
SHORT = {
    "jax_sdpa": "sdpa",
    "jax_sdpa_cudnn": "cudnn",
    "ours_causal": "ours",
    "fla_linear_attn": "fla_la",
    "ours_gla": "ours_gla",
    "fla_simple_gla": "fla_gla",
    "ours_delta": "ours_dr",
    "fla_delta_rule": "fla_dr",
    "layer_keras_mha": "mha_lyr",
    "layer_ours": "ours_lyr",
}
FULL = dict(batch=1, heads=8, dim=64)
QUICK = dict(batch=1, heads=2, dim=16)


class Unavailable(Exception):
    """This implementation cannot run here (the message says why)."""


class Bench:
    """One compiled, warmed-up function: `step()` launches one call,
    `block(result)` waits for it."""

    def __init__(self, step, block, compile_s, memory_bytes, memory_source):
        self.step, self.block = step, block
        self.compile_s, self.memory_bytes, self.memory_source = (
            compile_s,
            memory_bytes,
            memory_source,
        )


# --- inputs -----------------------------------------------------------------


def make_inputs(n: int, shapes: dict) -> dict:
    """float32 NumPy inputs shared by every implementation of a row."""
    b, h, d = shapes["batch"], shapes["heads"], shapes["dim"]
    rng = np.random.default_rng(n)
    normal = lambda *s: rng.standard_normal(s).astype("float32")
    return {
        "q": normal(b, n, h, d) * d**-0.5,
        "k": normal(b, n, h, d) * d**-0.5,
        "v": normal(b, n, h, d),
        # log σ(g) with g around 4: decays near 0.98 per token.
        "gate": normal(b, n, h) + 4.0,
        "beta": normal(b, n, h),
        "x": normal(b, n, h * d),
    }


# --- JAX implementations ----------------------------------------------------


def _platform() -> str:
    return jax.devices()[0].platform


def _xla_memory(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    peak = getattr(m, "peak_memory_in_bytes", None)
    if peak:
        return int(peak)
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def jax_bench(fn, args: tuple, mode: str) -> Bench:
    """jit-compile `fn(*args)` (fwd) or the gradient of `sum(fn(*args))`
    w.r.t. every argument (fwdbwd), and run it once."""
    if mode == "fwd":
        f = fn
    else:

        def loss(*a):
            return jnp.sum(fn(*a).astype(jnp.float32))

        f = jax.grad(loss, argnums=tuple(range(len(args))))
    start = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return Bench(
        lambda: compiled(*args),
        jax.block_until_ready,
        time.perf_counter() - start,
        _xla_memory(compiled),
        "xla_memory_analysis",
    )


def _jax_args(inputs: dict, names: str, dtype: str) -> tuple:
    return tuple(jnp.asarray(inputs[k], dtype=dtype) for k in names.split())


def _l2(x):
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6)


def build_jax(name: str, inputs: dict, dtype: str, mode: str, shapes: dict) -> Bench:
    if name == "jax_sdpa":
        fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jax_bench(fn, _jax_args(inputs, "q k v", dtype), mode)
    if name == "jax_sdpa_cudnn":
        if _platform() != "gpu":
            raise Unavailable(f"cuDNN attention needs a CUDA GPU (JAX platform {_platform()})")
        fn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
        return jax_bench(fn, _jax_args(inputs, "q k v", dtype), mode)
    if name == "ours_causal":
        fn = lambda q, k, v: kla.ops.causal_linear_attention(elu_plus_one(q), elu_plus_one(k), v)
        return jax_bench(fn, _jax_args(inputs, "q k v", dtype), mode)
    if name == "ours_gla":
        fn = lambda q, k, v, g: kla.ops.gated_linear_attention(q, k, v, jax.nn.log_sigmoid(g))
        return jax_bench(fn, _jax_args(inputs, "q k v gate", dtype), mode)
    if name == "ours_delta":
        fn = lambda q, k, v, b: kla.ops.delta_rule_attention(
            q, _l2(k).astype(k.dtype), v, jax.nn.sigmoid(b)
        )
        return jax_bench(fn, _jax_args(inputs, "q k v beta", dtype), mode)
    if name in ("layer_keras_mha", "layer_ours"):
        return _layer_bench(name, inputs, dtype, mode, shapes)
    raise ValueError(name)


def _layer_bench(name: str, inputs: dict, dtype: str, mode: str, shapes: dict) -> Bench:
    h, d = shapes["heads"], shapes["dim"]
    if name == "layer_keras_mha":
        layer = keras.layers.MultiHeadAttention(h, d, dtype=dtype)
    else:
        layer = kla.LinearMultiHeadAttention(h, d, dtype=dtype)
    x = jnp.asarray(inputs["x"], dtype=dtype)
    layer(x[:, :2], x[:, :2])  # build
    weights = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def fn(weights, x):
        out, _ = layer.stateless_call(weights, frozen, x, x, use_causal_mask=True)
        return out

    return jax_bench(fn, (weights, x), mode)


# --- PyTorch / flash-linear-attention ---------------------------------------

_FLA: dict = {}


def _fla():
    """(torch, {name: kernel}) or Unavailable with the reason."""
    if "error" in _FLA:
        raise Unavailable(_FLA["error"])
    if _FLA:
        return _FLA["torch"], _FLA["kernels"]
    try:
        import torch
    except Exception as e:
        _FLA["error"] = f"PyTorch does not import ({type(e).__name__}: {e})"
        raise Unavailable(_FLA["error"]) from None
    if not torch.cuda.is_available():
        _FLA["error"] = "PyTorch sees no CUDA device (fla's kernels are Triton on CUDA)"
        raise Unavailable(_FLA["error"])
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        _FLA["error"] = f"flash-linear-attention does not import ({type(e).__name__}: {e})"
        raise Unavailable(_FLA["error"]) from None
    _FLA.update(
        torch=torch,
        kernels={
            "fla_linear_attn": chunk_linear_attn,
            "fla_simple_gla": chunk_simple_gla,
            "fla_delta_rule": chunk_delta_rule,
        },
    )
    return torch, _FLA["kernels"]


def build_fla(name: str, inputs: dict, dtype: str, mode: str) -> Bench:
    torch, kernels = _fla()
    f = torch.nn.functional
    kernel = kernels[name]
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    if name == "fla_linear_attn":
        names = "q k v"
        fn = lambda q, k, v: kernel(f.elu(q) + 1, f.elu(k) + 1, v, scale=1.0, normalize=True)[0]
    elif name == "fla_simple_gla":
        names = "q k v gate"
        fn = lambda q, k, v, g: kernel(q, k, v, g=f.logsigmoid(g), scale=1.0)[0]
    else:
        names = "q k v beta"
        fn = lambda q, k, v, b: kernel(q, f.normalize(k, dim=-1), v, torch.sigmoid(b), scale=1.0)[0]
    grad = mode == "fwdbwd"
    args = [
        torch.from_numpy(inputs[k]).to("cuda", tdtype).requires_grad_(grad) for k in names.split()
    ]
    if grad:
        step = lambda: torch.autograd.grad(fn(*args).float().sum(), args)
    else:

        def step():
            with torch.no_grad():
                return fn(*args)

    block = lambda _: torch.cuda.synchronize()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    block(step())  # Triton compiles and autotunes here
    compile_s = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - before
    return Bench(step, block, compile_s, int(memory), "torch_max_memory_allocated")


def build(name: str, inputs: dict, dtype: str, mode: str, shapes: dict) -> Bench:
    if name.startswith("fla_"):
        return build_fla(name, inputs, dtype, mode)
    return build_jax(name, inputs, dtype, mode, shapes)


# --- guards -----------------------------------------------------------------


def device_memory_bytes() -> tuple[int, str]:
    """What one configuration may use: the JAX device's limit, else half of
    the host's available memory (CPU)."""
    stats = _memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "jax bytes_limit"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024 // 2, "half of MemAvailable"
    except OSError:
        pass
    return 8 << 30, "assumed 8 GiB"


def _memory_stats() -> dict | None:
    try:
        return jax.devices()[0].memory_stats()
    except Exception:
        return None


def estimate_bytes(name: str, n: int, dtype: str, mode: str, shapes: dict) -> int:
    """A rough upper estimate of one call's device memory."""
    b, h, d = shapes["batch"], shapes["heads"], shapes["dim"]
    item = 2 if dtype == "bfloat16" else 4
    io = b * n * h * d * item * 4 * (3 if mode == "fwdbwd" else 1)
    chunk_states = b * h * max(1, n // 64) * d * d * 4 * (4 if mode == "fwdbwd" else 2)
    linear = 8 * io + chunk_states
    if name in QUADRATIC_MEMORY and not (
        name == "layer_keras_mha" and dtype != "float32" and _platform() == "gpu"
    ):
        # float32 scores and probabilities; the gradient keeps and makes more.
        return linear + b * h * n * n * 4 * (4 if mode == "fwdbwd" else 2)
    return linear


def extrapolated_seconds(name: str, n: int, seen: dict) -> float | None:
    """Time of one call at `n` from the longest shorter N measured."""
    shorter = [(m, s) for m, s in seen.items() if m < n]
    if not shorter:
        return None
    m, s = max(shorter)
    return s * (n / m) ** (2 if name in QUADRATIC_TIME else 1)


# --- timing -----------------------------------------------------------------


def interleave(benches: dict, rounds: int, budget_s: float, min_call_s: float) -> dict:
    """Time warmed-up benches in alternation; per round each timed call runs
    `reps` steps (enough for `min_call_s`) and waits once. Returns per-step
    times per round, reps, and the error of any bench that failed (dropped
    from the timings)."""
    reps, failed = {}, {}

    def timed(name: str, count: int) -> float | None:
        bench = benches[name]
        start = time.perf_counter()
        try:
            out = None
            for _ in range(count):
                out = bench.step()
            bench.block(out)
        except Exception as e:  # e.g. out of memory once others hold theirs
            failed[name] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            return None
        return time.perf_counter() - start

    for name in benches:
        once = timed(name, 1)
        if once is not None:
            reps[name] = max(1, min(100, math.ceil(min_call_s / max(once, 1e-7))))
    times: dict = {name: [] for name in reps}
    spent = 0.0
    for round_ in range(max(rounds, 3)):
        if round_ >= 3 and spent >= budget_s:
            break
        names = [name for name in reps if name not in failed]
        for name in names if round_ % 2 == 0 else names[::-1]:
            elapsed = timed(name, reps[name])
            if elapsed is not None:
                spent += elapsed
                times[name].append(elapsed / reps[name])
    times = {name: ts for name, ts in times.items() if name not in failed}
    return {"times": times, "reps": reps, "failed": failed}


def ratios(times: dict) -> dict:
    """`over[base][impl]`: median over rounds of base's time / impl's."""
    over = {}
    for base in BASELINES:
        if base in times:
            over[base] = {
                name: statistics.median(tb / tn for tb, tn in zip(times[base], ts, strict=True))
                for name, ts in times.items()
            }
    for ours, theirs in PAIRS.items():
        if ours in times and theirs in times:
            over.setdefault(theirs, {})[ours] = statistics.median(
                tb / tn for tb, tn in zip(times[theirs], times[ours], strict=True)
            )
    return over


def measure_row(n, dtype, mode, args, shapes, state) -> dict:
    start = time.perf_counter()
    inputs = make_inputs(n, shapes)
    impls, benches = {}, {}
    for name in args.impls:
        est = estimate_bytes(name, n, dtype, mode, shapes)
        guess = extrapolated_seconds(name, n, state["seen"].setdefault((name, dtype, mode), {}))
        if time.perf_counter() - state["start"] > args.max_seconds:
            impls[name] = {"status": "skipped: --max-seconds spent"}
        elif est > state["memory_limit"]:
            impls[name] = {
                "status": f"skipped: estimated {est / 2**30:.1f} GiB > "
                f"{state['memory_limit'] / 2**30:.1f} GiB ({state['memory_limit_source']})",
                "estimate_bytes": est,
            }
        elif guess is not None and guess > args.max_call_s:
            impls[name] = {
                "status": f"skipped: one call extrapolated to {guess:.3g} s > --max-call-s"
            }
        else:
            try:
                benches[name] = build(name, inputs, dtype, mode, shapes)
                bench = benches[name]
                impls[name] = {
                    "status": "ok",
                    "compile_s": bench.compile_s,
                    "memory_bytes": bench.memory_bytes,
                    "memory_source": bench.memory_source,
                    "estimate_bytes": est,
                }
            except Unavailable as e:
                impls[name] = {"status": f"unavailable: {e}"}
            except Exception as e:  # OOM, unsupported dtype, kernel limits
                message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                impls[name] = {"status": f"failed: {message}"}
    over = {}
    if benches:
        timing = interleave(benches, args.rounds, args.budget_s, args.min_call_s)
        for name, message in timing["failed"].items():
            impls[name]["status"] = f"failed: while timing: {message}"
        for name, ts in timing["times"].items():
            seconds = statistics.median(ts)
            impls[name].update(ms=1e3 * seconds, runs=len(ts), reps=timing["reps"][name])
            state["seen"][(name, dtype, mode)][n] = seconds
        over = ratios(timing["times"])
    del benches
    stats = _memory_stats() or {}
    _release_torch()
    return {
        "n": n,
        "dtype": dtype,
        "mode": mode,
        **shapes,
        "impls": impls,
        "over": over,
        "jax_peak_bytes_so_far": stats.get("peak_bytes_in_use"),
        "seconds": time.perf_counter() - start,
    }


def _release_torch() -> None:
    if "torch" in _FLA:
        _FLA["torch"].cuda.empty_cache()


# --- order, table, machine --------------------------------------------------


def plan(lengths: list[int], dtypes: list[str], modes: list[str]) -> list[tuple]:
    """The rows in the order they run: every other length counted down from
    the longest (by default 1024, 4096, 16384, 65536: the issue's targets)
    for each dtype and mode, then the other lengths likewise; so a run cut
    short by its time limit has bf16 forward+backward across the lengths
    first. The JSON lists rows sorted by dtype, mode and N."""
    lengths = sorted(set(lengths))
    coarse = sorted(lengths[::-2])
    fine = [n for n in lengths if n not in coarse]
    return [(n, d, m) for group in (coarse, fine) for d in dtypes for m in modes for n in group]


def print_header(impls: list[str]) -> None:
    names = "".join(f"{SHORT[i]:>9}" for i in impls)
    print(f"{'dtype':<5} {'mode':<6} {'N':>6} | ms:{names} | sdpa/x:{names}", flush=True)


def print_row(row: dict, impls: list[str]) -> None:
    ms = "".join(
        f"{row['impls'][i]['ms']:9.3f}" if "ms" in row["impls"][i] else f"{'-':>9}" for i in impls
    )
    over = row["over"].get("jax_sdpa", {})
    ratio = "".join(f"{over[i]:9.2f}" if i in over else f"{'-':>9}" for i in impls)
    dtype = {"bfloat16": "bf16", "float32": "f32"}[row["dtype"]]
    print(f"{dtype:<5} {row['mode']:<6} {row['n']:>6} | ms:{ms} | sdpa/x:{ratio}", flush=True)
    for i in impls:
        status = row["impls"][i]["status"]
        if status != "ok" and not status.startswith("unavailable"):
            print(f"    {i}: {status}", flush=True)


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    dists = [
        "jax",
        "jaxlib",
        "jax-cuda12-plugin",
        "jax-cuda13-plugin",
        "keras",
        "numpy",
        "torch",
        "triton",
        "fla-core",
        "flash-linear-attention",
    ]
    info = {
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_device_kind": jax.devices()[0].device_kind,
        "jax_platform": _platform(),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "memory_stats": _memory_stats(),
        "nvidia_smi": _run(["nvidia-smi"]),
        "nvidia_smi_query": _run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                "--format=csv",
            ]
        ),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "keras_backend": keras.backend.backend(),
        "keras_linear_attention": kla.__version__,
        "versions": {d: _version(d) for d in dists},
    }
    try:
        torch, _ = _fla()
        info["torch_device"] = torch.cuda.get_device_name(0)
        info["torch_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    except Unavailable as e:
        info["fla"] = f"unavailable: {e}"
    return info


def targets(rows: list[dict]) -> dict:
    """The issue's GPU targets, read off bfloat16 forward+backward rows."""
    out = {}
    for row in rows:
        if row["dtype"] != "bfloat16" or row["mode"] != "fwdbwd":
            continue
        n, ours = row["n"], row["impls"].get("ours_causal", {})
        cudnn = row["over"].get("jax_sdpa_cudnn", {}).get("ours_causal")
        if n >= 4096 and cudnn is not None:
            out[f"cudnn_time_over_ours_N{n} (target > 1)"] = cudnn
        fla = row["over"].get("fla_linear_attn", {}).get("ours_causal")
        if n == 16384 and fla is not None:
            out[f"fla_time_over_ours_N{n} (target >= 0.5)"] = fla
        if ours.get("memory_bytes"):
            out[f"ours_memory_MiB_N{n} (linear in N)"] = ours["memory_bytes"] / 2**20
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU, for the smoke test")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--rounds", type=int, default=7, help="timing rounds per row (>= 3)")
    p.add_argument("--budget-s", type=float, default=1.5, help="timing per row after 3 rounds")
    p.add_argument("--min-call-s", type=float, default=0.02, help="each timed call's least length")
    p.add_argument("--max-call-s", type=float, default=5.0, help="skip longer extrapolated calls")
    p.add_argument("--max-seconds", type=float, default=1e9, help="stop starting rows after this")
    p.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    args = p.parse_args(argv)
    if keras.backend.backend() != "jax":  # keras was imported before this module
        p.error(f"needs KERAS_BACKEND=jax; keras runs on {keras.backend.backend()}")
    shapes = QUICK if args.quick else FULL
    if args.lengths is None:
        # 320 > the short-sequence threshold (256): the chunked paths.
        args.lengths = [320] if args.quick else LENGTHS
    if args.quick:
        args.rounds, args.budget_s, args.min_call_s = 3, 0.0, 0.0
        if args.dtypes == DTYPES:
            args.dtypes = ["bfloat16"]
    limit, source = device_memory_bytes()
    state = {
        "start": time.perf_counter(),
        "seen": {},
        "memory_limit": limit,
        "memory_limit_source": source,
    }
    report = {
        "machine": machine(),
        "shapes": shapes,
        "layer_model_dim": shapes["heads"] * shapes["dim"],
        "impls": args.impls,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "memory_limit_bytes": limit,
        "results": [],
        "complete": False,
    }
    print(
        f"{report['machine']['jax_devices']}, B={shapes['batch']}, {shapes['heads']} heads of "
        f"{shapes['dim']}; ms per call, then jax_sdpa time / x",
        flush=True,
    )
    print_header(args.impls)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, dtype, mode in plan(args.lengths, args.dtypes, args.modes):
        row = measure_row(n, dtype, mode, args, shapes, state)
        report["results"].append(row)
        print_row(row, args.impls)
        report["results"].sort(
            key=lambda r: (DTYPES.index(r["dtype"]), MODES.index(r["mode"]), r["n"])
        )
        report["seconds"] = time.perf_counter() - state["start"]
        report["targets"] = targets(report["results"])
        out.write_text(json.dumps(report, indent=1) + "\n")
    report["complete"] = True
    out.write_text(json.dumps(report, indent=1) + "\n")
    for key, value in report["targets"].items():
        print(f"{key}: {value:.3g}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
