"""Run ONE fast-transformers configuration; print its result as one JSON line.

The paper's own code (PyTorch CPU): `AttentionLayer(CausalLinearAttention)`
with the shapes `bench_config.py` uses for our layers, forward and
forward+backward (gradients for the input and the weights). It runs in a
process that never imports TensorFlow, so its peak memory is its own.

    python benchmarks/bench_fast_transformers.py '{"kind": "layer",
        "impl": "fast_transformers_causal", "n": 4096, "jit": false}'

fast-transformers is not a dependency. Its CPU build needs torch first and
no CUDA compiler on PATH (benchmarks/README.md, "fast-transformers beside
ours"); without it the result says "not installed".
"""

from __future__ import annotations

from _process import HEADS, KEY_DIM, MODEL_DIM, main, peak_rss_mib
from _timing import timed


def run(cfg: dict) -> dict:
    result = dict(cfg)
    try:
        import torch
        from fast_transformers.attention import AttentionLayer, CausalLinearAttention
        from fast_transformers.masking import LengthMask, TriangularCausalMask
    except ImportError as err:
        return {**result, "status": f"not installed ({err})"}
    n = cfg["n"]
    torch.manual_seed(0)
    layer = AttentionLayer(CausalLinearAttention(KEY_DIM), MODEL_DIM, HEADS)
    x = torch.randn(1, n, MODEL_DIM, requires_grad=True)
    mask, lengths = TriangularCausalMask(n), LengthMask(torch.full((1,), n, dtype=torch.int64))

    def forward():
        with torch.no_grad():
            return layer(x, x, x, mask, lengths, lengths).numpy()

    def forward_backward():
        layer.zero_grad()
        x.grad = None
        layer(x, x, x, mask, lengths, lengths).sum().backward()
        return x.grad.numpy()

    for mode, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        timing = timed(fn, cfg.get("repeats", 3), cfg.get("budget_s", 20))
        result[mode] = {**timing, "peak_rss_mib": peak_rss_mib()}
    result["torch"] = torch.__version__
    result["status"] = "ok"
    result["peak_rss_mib"] = peak_rss_mib()
    return result


if __name__ == "__main__":
    main(run)
