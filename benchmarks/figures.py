"""Plots of a suite run: the paper's Figure 1 for our layers, the core math
against the matmul yardstick, and the chunk-size sweep.

    python benchmarks/figures.py benchmarks/results/suite.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "keras_mha_causal": "Keras MHA, causal",
    "keras_mha": "Keras MHA",
    "linear_causal": "LinearMHA, causal",
    "linear": "LinearMHA",
    "causal_layer": "CausalLinearAttention",
    "retention_layer": "CausalLinearAttention, retention",
    "gated_layer": "CausalLinearAttention, gated",
    "delta_layer": "CausalLinearAttention, delta",
    "gated_delta_layer": "CausalLinearAttention, gated_delta",
    "projections": "projections alone (floor)",
    "fast_transformers_causal": "fast-transformers, causal (PyTorch)",
    "softmax_causal": "softmax, causal (explicit N×N)",
    "causal": "linear, causal (chunked)",
    "noncausal": "linear, non-causal",
}


def _series(results: list, kind: str, impl: str, jit: bool, field) -> tuple:
    pts = [
        (r["n"], field(r))
        for r in results
        if (r["kind"], r.get("impl"), r["jit"]) == (kind, impl, jit)
        and not r.get("sweep")
        and r["status"] == "ok"
    ]
    return tuple(zip(*sorted(pts), strict=True)) if pts else ((), ())


def _loglog(ax, title: str, ylabel: str, xlabel: str = "sequence length N") -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if not any(len(line.get_xdata()) for line in ax.lines):
        ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
        return
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)


def figure1(report: dict, path: Path) -> None:
    """Time and peak memory of one forward+backward pass against N."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, jit in enumerate((False, True)):
        mode = "XLA" if jit else "no XLA (Keras default on CPU)"
        for impl, label in LABELS.items():
            if impl in ("softmax_causal", "causal", "noncausal"):
                continue
            style = "--" if impl.startswith(("keras", "fast")) else "-"
            style = "-." if impl == "projections" else style
            n, t = _series(report["results"], "layer", impl, jit, lambda r: r["fwdbwd"]["seconds"])
            axes[row, 0].plot(n, t, style, marker="o", label=label)
            n, m = _series(
                report["results"], "layer", impl, jit, lambda r: r["fwdbwd"]["peak_rss_mib"]
            )
            axes[row, 1].plot(n, m, style, marker="o", label=label)
        _loglog(axes[row, 0], f"forward+backward time, {mode}", "seconds")
        _loglog(axes[row, 1], f"peak process memory, {mode}", "MiB (batch 1)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(_subtitle(report))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def core_figure(report: dict, path: Path) -> None:
    """The attention math alone: time and achieved FLOP rate."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in ("softmax_causal", "causal", "noncausal"):
        for jit in (False, True):
            label = f"{LABELS[impl]}{', XLA' if jit else ''}"
            style = "--" if jit else "-"
            n, t = _series(report["results"], "core", impl, jit, lambda r: r["fwdbwd"]["seconds"])
            axes[0].plot(n, t, style, marker="o", label=label)
            n, g = _series(report["results"], "core", impl, jit, lambda r: r["fwdbwd"]["gflops"])
            axes[1].plot(n, g, style, marker="o", label=label)
    rates = [r["matmul_gflops"] for r in report["results"] if "matmul_gflops" in r]
    if rates:
        axes[1].axhline(sorted(rates)[len(rates) // 2], color="k", lw=1, label="4096² matmul")
    _loglog(axes[0], "attention core, forward+backward", "seconds")
    _loglog(axes[1], "achieved matmul FLOP rate", "GFLOP/s")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(_subtitle(report))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_figure(report: dict, path: Path) -> None:
    """Causal core forward+backward time against chunk size."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sweep = [r for r in report["results"] if r.get("sweep") and r["status"] == "ok"]
    for n in sorted({r["n"] for r in sweep}):
        for jit in (False, True):
            pts = sorted(
                (r["chunk"], r["fwdbwd"]["seconds"])
                for r in sweep
                if (r["n"], r["jit"]) == (n, jit)
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    "--" if jit else "-",
                    marker="o",
                    label=f"N={n}{', XLA' if jit else ''}",
                )
    _loglog(ax, "causal core, forward+backward", "seconds", "chunk size C")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _subtitle(report: dict) -> str:
    m = report["machine"]
    return (
        f"{m['cpu']}, {m['cores']} cores; TF {m['tensorflow']}, Keras {m['keras']}; "
        "float32, batch 1, 8 heads of 64"
    )


def training_shapes_figure(reports: list, path: Path) -> None:
    """Keras MHA time / ours against N (`training_shapes.py` runs: TF graph
    mode, TF XLA and JAX rows of each), causal and not."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, causal in zip(axes, (True, False), strict=True):
        for report in reports:
            backend = report["machine"].get("backend", "tensorflow")
            for jit in (False, True):
                rows = sorted(
                    (r for r in report["results"] if (r["causal"], r["jit"]) == (causal, jit)),
                    key=lambda r: r["n"],
                )
                if rows:
                    label = "JAX (XLA)" if backend == "jax" else f"TF {'XLA' if jit else 'graph'}"
                    ns = [r["n"] for r in rows]
                    ax.plot(ns, [r["mha_over"]["ours"] for r in rows], marker="o", label=label)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="sequence length N",
            title=f"LinearMultiHeadAttention, {'causal' if causal else 'non-causal'}",
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("Keras MHA time / ours (above 1: ours faster)")
    axes[0].legend()
    shapes = reports[0]["shapes"]
    fig.suptitle(
        f"forward+backward, B = {shapes['batch']}, dim {shapes['model_dim']}, "
        f"{shapes['heads']} heads; {reports[0]['machine']['cpu']}, "
        f"{reports[0]['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all(report: dict, out: Path) -> list:
    paths = [out / "figure1.png", out / "core.png", out / "chunk_sweep.png"]
    for plot, path in zip((figure1, core_figure, sweep_figure), paths, strict=True):
        plot(report, path)
    return paths


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(plot_all(json.loads(source.read_text()), source.parent))
