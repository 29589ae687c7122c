"""Issue 3's targets as a Markdown table, computed from one suite run.

python benchmarks/targets.py benchmarks/results/suite.json
"""

from __future__ import annotations

import json
import sys

# fast-transformers (PyTorch CPU, causal linear AttentionLayer, same shapes),
# forward+backward, from an earlier measurement on this machine kind (fresh
# process, median; benchmarks/README.md, "fast-transformers beside ours"):
# used only when the suite could not run it beside ours.
FAST_TRANSFORMERS_NOTES_MS = {4096: 252.0, 16384: 1488.0}


class Results:
    """Lookups into a suite report."""

    def __init__(self, report: dict):
        self.rows = [r for r in report["results"] if not r.get("sweep")]
        self.pairs = [r for r in self.rows if r["kind"] == "pair" and r["status"] == "ok"]

    def find(self, kind: str, impl: str | None, n: int, jit: bool) -> dict | None:
        for r in self.rows:
            if (r["kind"], r.get("impl"), r["n"], r["jit"]) == (kind, impl, n, jit):
                return r if r["status"] == "ok" else None
        return None

    def seconds(self, impl: str, n: int, jit: bool, mode="fwdbwd", kind="layer") -> float | None:
        r = self.find(kind, impl, n, jit)
        return r[mode]["seconds"] if r else None

    def ratio(self, a: str, b: str, n: int, jit: bool, n_b: int | None = None) -> float | None:
        ta, tb = self.seconds(a, n, jit), self.seconds(b, n_b or n, jit)
        return ta / tb if ta and tb else None

    def paired(self, a: str, b: str, n: int, jit: bool) -> float | None:
        """`a`'s time / `b`'s, timed in alternation in one process (a pair
        run with `b` as its baseline)."""
        for r in self.pairs:
            if (r["impls"][0], r["n"], r["jit"]) == (b, n, jit) and a in r["impls"]:
                return r["fwdbwd"]["ratio_to_first"][a]
        return None

    def both(self, a: str, b: str, n: int) -> tuple:
        """`a`/`b` ratios: ((same process: no XLA, XLA), (separate processes:
        no XLA, XLA))."""
        jits = (False, True)
        return tuple(self.paired(a, b, n, j) for j in jits), tuple(
            self.ratio(a, b, n, j) for j in jits
        )


def _fmt(value: float | None, unit: str = "×") -> str:
    return "not run" if value is None else f"{value:.2f}{unit}"


def _check(value: float | None, limit: float, at_most: bool) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value <= limit if at_most else value >= limit) else "**no**"


def rows(report: dict) -> list:
    """(target, no-XLA value, XLA value, limit, at_most, unit[, separate])
    per target. Ratios of two layers are read from pair runs (one process,
    alternating); `separate` then holds the same ratios from the layers'
    own processes, for comparison."""
    res, out = Results(report), []
    for impl in ("linear_causal", "causal_layer"):
        paired, separate = res.both(impl, "keras_mha_causal", 512)
        out.append((f"{impl} / Keras MHA causal, N=512", *paired, 1.0, True, "×", separate))
    for n, limit in ((4096, 4.0), (8192, 8.0)):
        for impl in ("linear_causal", "causal_layer"):
            name = f"Keras MHA causal / {impl}, N={n} (speed-up)"
            vals = [res.ratio("keras_mha_causal", impl, n, jit) for jit in (False, True)]
            out.append((name, *vals, limit, False, "×"))
    for n in (4096, 16384):
        for impl in ("linear_causal", "causal_layer"):
            paired, separate = res.both(impl, "linear", n)
            name = f"{impl} / non-causal layer, N={n}"
            out.append((name, *paired, 1.3, True, "×", separate))
    for n, notes_ms in FAST_TRANSFORMERS_NOTES_MS.items():
        measured = _ms(res.seconds("fast_transformers_causal", n, False))
        ref, where = (measured, "same run") if measured else (notes_ms, "earlier measurement")
        for impl in ("linear_causal", "causal_layer"):
            vals = [_ms(res.seconds(impl, n, jit)) for jit in (False, True)]
            name = f"{impl} ms, N={n} (fast-transformers {ref:.0f} ms, {where})"
            out.append((name, *vals, ref, True, " ms"))
    for impl in ("linear_causal", "causal_layer"):
        vals = [res.ratio(impl, impl, 65536, jit, n_b=4096) for jit in (False, True)]
        out.append((f"{impl} time N=65536 / N=4096", *vals, 18.0, True, "×"))
        for stat in ("median", "max"):
            vals = [_peak(res.find("layer", impl, 65536, jit), stat) for jit in (False, True)]
            name = f"{impl} peak process memory, N=65536 ({stat} of its processes)"
            out.append((name, *vals, 3072.0, True, " MiB"))
    for impl, limit in (("retention", 1.3), ("gated", 1.3), ("delta", 2.5), ("gated_delta", 2.5)):
        # Pair runs only: `suite.py --merge` may add these rows to an older run.
        paired, _ = res.both(f"{impl}_layer", "causal_layer", 4096)
        name = f"recurrence {impl} / linear (CausalLinearAttention), N=4096"
        out.append((name, *paired, limit, True, "×"))
    paired, separate = res.both("linear", "projections", 16384)
    name = "non-causal layer / its projections, N=16384"
    out.append((name, *paired, 1.25, True, "×", separate))
    vals = [_flop_share(res.find("core", "causal", 16384, jit)) for jit in (False, True)]
    out.append(("core causal fwd+bwd GFLOP/s / matmul GFLOP/s, N=16384", *vals, 0.40, False, ""))
    fit = [res.find("fit", None, _fit_n(report), jit) for jit in (False, True)]
    ratio = fit[1]["seconds"] / fit[0]["seconds"] if all(fit) else None
    out.append(("model.fit step, jit_compile=True / default", ratio, ratio, 1.2, True, "×"))
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _peak(r: dict | None, stat: str) -> float | None:
    if not r:
        return None
    runs = sorted(r.get("peak_rss_mib_runs", [r["fwdbwd"]["peak_rss_mib"]]))
    return runs[-1] if stat == "max" else runs[len(runs) // 2]


def _flop_share(r: dict | None) -> float | None:
    return r["fwdbwd"]["gflops"] / r["matmul_gflops"] if r else None


def _fit_n(report: dict) -> int:
    return next((r["n"] for r in report["results"] if r["kind"] == "fit"), 0)


def table(report: dict) -> str:
    lines = [
        "| target | no XLA (default) | met | XLA | met | limit "
        "| separate processes (no XLA / XLA) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, plain, xla, limit, at_most, unit, *separate in rows(report):
        bound = f"{'≤' if at_most else '≥'} {limit:g}{unit}"
        apart = " / ".join(_fmt(v, unit) for v in separate[0]) if separate else ""
        lines.append(
            f"| {name} | {_fmt(plain, unit)} | {_check(plain, limit, at_most)} "
            f"| {_fmt(xla, unit)} | {_check(xla, limit, at_most)} | {bound} | {apart} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(json.loads(open(sys.argv[1]).read())))
