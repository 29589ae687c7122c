"""Project-level checks: lint, the example and the benchmark run (smoke)."""

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_lint_and_format():
    for cmd in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_benchmark_smoke():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import layer_speed

    rows = layer_speed.main(["--lengths", "16", "--dim", "32", "--heads", "2", "--repeats", "1"])
    assert rows[0]["n"] == 16
    assert all(rows[0][k] > 0 for k in rows[0] if k not in ("n", "jit"))


@pytest.mark.slow
def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    acc = float(out.split("held-out accuracy ")[1].split()[0])
    err = float(out.split("max abs difference ")[1].split()[0])
    assert acc > 0.9 and err < 1e-5, out


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
