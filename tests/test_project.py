"""Smoke runs: the benchmarks and examples end to end at tiny sizes, and the
README's Python blocks.

Every test here is marked `smoke`: CI runs them as their own step
(`bash .ci/test smoke`, i.e. `pytest -m smoke`) and its unit step deselects
them. Lint and the other backends are CI steps of their own (`.ci/test`).
"""

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_debian_data

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.smoke


def test_benchmark_suite_smoke(tmp_path):
    """The suite end to end at N = 128: one process per configuration, JSON,
    figures and the target table."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import suite

    report = suite.main(["--quick", "--jit", "off", "--out", str(tmp_path)])
    results = report["results"]
    baseline = [r for r in results if r.get("impl") in suite.BASELINE_IMPLS]
    # fast-transformers is no dependency: measured where installed, else said so.
    statuses = [r["status"] for r in baseline]
    assert all(s == "ok" or s.startswith("not installed") for s in statuses), statuses
    results = [r for r in results if r not in baseline]
    assert {r["status"] for r in results} == {"ok"}, [r["status"] for r in results]
    layer = [r for r in results if r["kind"] == "layer"]
    assert {r["impl"] for r in layer} == set(suite.LAYER_IMPLS + suite.RECURRENCE_IMPLS)
    assert {r["impl"] for r in baseline} == set(suite.BASELINE_IMPLS)
    for mode in ("fwd", "fwdbwd"):
        assert all(r[mode]["seconds"] > 0 and r[mode]["peak_rss_mib"] > 0 for r in layer)
    pairs = [r for r in results if r["kind"] == "pair"]
    assert {tuple(impls) for impls, _ in suite.PAIRS} == {tuple(r["impls"]) for r in pairs}
    for r in pairs:
        ratios = r["fwdbwd"]["ratio_to_first"]
        assert ratios[r["impls"][0]] == 1.0 and all(v > 0 for v in ratios.values())
        assert r["fwdbwd"]["rounds"] >= 3
    core = [r for r in results if r["kind"] == "core"]
    assert all(r["fwdbwd"]["gflops"] > 0 and r["matmul_gflops"] > 0 for r in core)
    assert json.loads((tmp_path / "suite.json").read_text())["machine"]["cores"] > 0
    for name in ("figure1.png", "core.png", "chunk_sweep.png", "targets.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| target |" in (tmp_path / "targets.md").read_text()


def test_generation_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import generation_speed

    argv = ["--contexts", "16", "32", "--repeats", "1", "--memory-steps", "2"]
    argv += ["--hidden-dim", "16", "--batch", "2", "--png", str(tmp_path / "g.png")]
    rows = generation_speed.main(argv)
    assert [r["context"] for r in rows] == [16, 32]
    assert all(r["linear_ms"] > 0 and r["softmax_cache_ms"] > 0 for r in rows)
    for r in rows:  # batch 2: two tokens per step
        assert r["linear_tokens_per_s"] == pytest.approx(2000 / r["linear_ms"])
    assert (tmp_path / "g.png").exists()


def test_edge_benchmark_smoke():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import edge_latency

    argv = ["--lengths", "8", "16", "--repeats", "1", "--hidden-dim", "16", "--num-layers", "1"]
    results = edge_latency.main(argv)
    assert set(results["tflite"]) == {"float32", "int8"}
    assert all(v > 0 for v in results["tflite"]["int8"]["step_ms_after_context"].values())


def test_recurrences_benchmark_smoke(tmp_path):
    """benchmarks/recurrences.py end to end at tiny sizes (its numbers mean nothing)."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "benchmarks/recurrences.py", "--quick", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
    results = json.loads(out.read_text())
    assert set(results["layers"]["256"]["ratio_to_first"]) == {
        "linear",
        "retention",
        "gated",
        "delta",
        "gated_delta",
    }
    assert results["long"]["peak_rss_mib"] > 0 and results["long"]["ratio"] > 0
    assert all(r["ratio"] > 0 for r in results["step"].values())


@pytest.mark.slow
def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    acc = float(out.split("held-out accuracy ")[1].split()[0])
    err = float(out.split("max abs difference ")[1].split()[0])
    assert acc > 0.9 and err < 1e-5, out


def _run_example(name, argv):
    sys.path.insert(0, str(ROOT / "examples"))
    module = __import__(name)
    return module.main(argv)


@pytest.mark.slow
@needs_debian_data
def test_main_job_smoke(tmp_path, fashion_mnist_dir):
    report = _run_example(
        "fashion_mnist",
        ["--train-examples", "512", "--epochs", "1", "--verbose", "0"]
        + ["--data-dir", fashion_mnist_dir, "--out", str(tmp_path / "fm"), "--compare-softmax"],
    )
    assert 0.1 < report["linear_accuracy"] <= 1 and 0.1 < report["softmax_accuracy"] <= 1
    assert abs(report["tflite_float32_accuracy"] - report["linear_accuracy"]) < 0.01
    assert (tmp_path / "fm" / "model.keras").exists()
    assert (tmp_path / "fm" / "serve.int8.tflite").exists()


@pytest.mark.slow
@needs_debian_data
def test_tuner_example_smoke(tmp_path, fashion_mnist_dir):
    result = _run_example(
        "tune_fashion_mnist",
        ["--trials", "1", "--train-examples", "256", "--data-dir", fashion_mnist_dir]
        + ["--directory", str(tmp_path)],
    )
    assert 0 <= result["test"] <= 1 and set(result["best"]) >= {"feature_map", "num_heads"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian package bible-kjv not installed")
def test_char_lm_example_smoke(tmp_path):
    report = _run_example(
        "char_lm",
        ["--steps", "8", "--sequence-length", "64", "--hidden-dim", "32", "--num-layers", "1"]
        + ["--eval-batches", "2", "--sample-length", "20", "--verbose", "0"]
        + ["--data-dir", str(tmp_path)],
    )
    assert 0 < report["test_bits_per_char"] < 8.5


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian package bible-kjv not installed")
def test_linearize_char_lm_example_smoke():
    # Graph mode: XLA is the transfer tests' business (tests/test_linearize.py).
    args = ["--quick", "--no-jit", "--verbose", "0", "--softmax-same-steps"]
    report = _run_example("linearize_char_lm", args)
    stages = [row["stage"] for row in report["stages"]]
    assert stages[0] == "softmax" and stages[-2].startswith("linear from scratch")
    assert stages[-1] == "softmax, 54 steps"  # 40 + 10 transfer + 4 fine-tune
    assert all(0 < row["bits"] < 8.5 for row in report["stages"])
    assert report["deploy"]["signatures"] == ["serve", "prefill", "step"]
    assert report["deploy"]["tflite_step_max_abs_error"] < 1e-3


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian package bible-kjv not installed")
def test_hub_text_generation_example_smoke(tmp_path):
    pytest.importorskip("keras_hub")
    argv = ["--quick", "--steps", "3", "--verbose", "0", "--data-dir", str(tmp_path / "data")]
    report = _run_example("hub_text_generation", argv + ["--out", str(tmp_path / "lm")])
    assert report["generated"].startswith("In the beginning")
    assert 0 < report["held_out_bits_per_byte"] < 8.5
    assert report["export"]["signatures"] == ["serve", "prefill", "step"]
    assert max(report["export"]["max_abs_error"].values()) < 1e-4


@needs_debian_data
def test_linearize_fashion_mnist_example_smoke(fashion_mnist_dir):
    report = _run_example(
        "linearize_fashion_mnist",
        ["--quick", "--no-jit", "--verbose", "0", "--data-dir", fashion_mnist_dir],
    )
    assert len(report["stages"]) == 5
    assert all(0 <= row["accuracy"] <= 1 for row in report["stages"])


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
