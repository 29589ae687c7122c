"""Smoke run of benchmarks/gpu.py on CPU (its numbers mean nothing).

The script runs in a subprocess (it needs `KERAS_BACKEND=jax`, while this
suite runs on TensorFlow) with TensorFlow made unimportable, as on the GPU
device machine, which has no TensorFlow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
# What runs anywhere JAX does; cuDNN and fla need a CUDA GPU.
JAX_IMPLS = {"jax_sdpa", "ours_causal", "ours_gla", "ours_delta", "layer_keras_mha", "layer_ours"}
REASONS = ("unavailable: ", "failed: ", "skipped: ")

pytestmark = pytest.mark.smoke


def test_gpu_benchmark_quick_without_tensorflow(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "gpu.json"
    runner = (
        "import runpy, sys; sys.modules['tensorflow'] = None; "
        f"sys.argv = [{str(SCRIPT)!r}, '--quick', '--out', {str(out)!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", runner],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sdpa/x" in done.stdout

    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert report["machine"]["keras_backend"] == "jax"
    assert report["machine"]["jax_devices"]
    impls = report["impls"]
    assert JAX_IMPLS < set(impls)
    rows = report["results"]
    assert {(r["n"], r["dtype"], r["mode"]) for r in rows} == {
        (320, "bfloat16", "fwdbwd"),
        (320, "bfloat16", "fwd"),
    }
    for row in rows:
        assert set(row["impls"]) == set(impls)
        for name, result in row["impls"].items():
            status = result["status"]
            if status == "ok":
                assert result["ms"] > 0 and result["runs"] >= 3 and result["reps"] >= 1
                assert result["compile_s"] > 0
            else:
                assert status.startswith(REASONS) and len(status) > 12, (name, status)
        ok = {name for name, r in row["impls"].items() if r["status"] == "ok"}
        assert JAX_IMPLS <= ok, row["impls"]
        # Ratios against jax.nn.dot_product_attention for everything measured,
        # and our layer against Keras MHA.
        assert set(row["over"]["jax_sdpa"]) == ok
        assert row["over"]["jax_sdpa"]["jax_sdpa"] == 1.0
        assert all(v > 0 for v in row["over"]["jax_sdpa"].values())
        assert row["over"]["layer_keras_mha"]["layer_ours"] > 0
        assert row["impls"]["ours_causal"]["memory_bytes"] > 0
