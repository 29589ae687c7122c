"""The quality benchmark (benchmarks/quality.py): the MQAR generator's
properties, and the `--quick` run end to end (JSON, Markdown table, plot)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import mqar  # noqa: E402

T, KV, V = 64, 6, 100


@pytest.fixture(scope="module")
def data():
    return mqar.generate(500, T, KV, V, seed=3)


def test_shapes_and_dtypes(data):
    assert data.inputs.shape == data.labels.shape == (500, T)
    assert data.positions.shape == data.targets.shape == data.keys.shape == (500, KV)
    for array in (data.inputs, data.labels, data.positions, data.targets):
        assert array.dtype == np.int32
    assert data.inputs.min() >= 0 and data.inputs.max() < V


def test_keys_and_values_from_their_halves_and_distinct(data):
    assert data.keys.min() >= 1 and data.keys.max() < V // 2
    assert data.values.min() >= V // 2 and data.values.max() < V
    for row in range(len(data.keys)):
        assert len(set(data.keys[row])) == KV
        assert len(set(data.values[row])) == KV


def test_context_is_key_value_pairs(data):
    np.testing.assert_array_equal(data.inputs[:, 0 : 2 * KV : 2], data.keys)
    np.testing.assert_array_equal(data.inputs[:, 1 : 2 * KV : 2], data.values)


def test_each_key_queried_once_later_with_its_value_as_label(data):
    rows = np.arange(len(data.inputs))[:, None]
    labelled = data.labels != mqar.IGNORE
    assert (labelled.sum(1) == KV).all()  # labels only at the KV query positions
    assert labelled[rows, data.positions].all()
    assert (data.positions >= 2 * KV).all() and (data.positions < T).all()
    assert ((data.positions - 2 * KV) % 2 == 0).all()  # Zoology's even query slots
    for row in range(len(data.inputs)):
        queried = data.inputs[row][labelled[row]]
        assert sorted(queried) == sorted(data.keys[row])  # every key exactly once
        pairs = dict(zip(data.keys[row], data.values[row], strict=True))
        for position in np.flatnonzero(labelled[row]):
            key = data.inputs[row, position]
            assert data.labels[row, position] == pairs[key]
    np.testing.assert_array_equal(data.labels[rows, data.positions], data.targets)
    np.testing.assert_array_equal(data.inputs[rows, data.positions], data.keys)
    np.testing.assert_array_equal(data.targets, data.values)


def test_gaps_follow_the_power_law():
    slots = (T - 2 * KV) // 2
    p = mqar.gap_probabilities(slots)
    assert p[0] > p[1] > p[-1] and abs(p.sum() - 1) < 1e-12
    data = mqar.generate(20_000, T, KV, V, seed=0)
    first = (data.positions[:, 0] - 2 * KV) // 2  # the first draw of each row
    freq = np.bincount(first, minlength=slots) / len(first)
    np.testing.assert_allclose(freq[:4], p[:4], atol=0.015)


def test_without_random_fill_the_rest_is_zero():
    data = mqar.generate(50, T, KV, V, seed=0, random_non_queries=False)
    filled = np.zeros_like(data.inputs, bool)
    filled[:, : 2 * KV] = True
    filled[np.arange(50)[:, None], data.positions] = True
    assert (data.inputs[~filled] == 0).all()


def test_seed_determines_the_data():
    a, b = mqar.generate(64, T, KV, V, seed=7), mqar.generate(64, T, KV, V, seed=7)
    c = mqar.generate(64, T, KV, V, seed=8)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize(
    "seq_len, kv, vocab, match",
    [
        (15, 4, 64, "4·num_kv_pairs ≤ seq_len"),
        (64, 17, 256, "4·num_kv_pairs ≤ seq_len"),
        (64, 8, 16, "too few for 8 distinct keys"),
        (64, 0, 64, "positive int"),
    ],
)
def test_bad_configs_raise_clearly(seq_len, kv, vocab, match):
    with pytest.raises(ValueError, match=match):
        mqar.generate(4, seq_len, kv, vocab, seed=0)


def test_smallest_valid_config():
    data = mqar.generate(10, 16, 4, 16, seed=0)  # 4·KV = T: one slot per query
    assert sorted(data.positions[0]) == [8, 10, 12, 14]


@pytest.mark.smoke
def test_quick_run_writes_json_table_and_plot(tmp_path, request):
    from keras_linear_attention.datasets import fashion_mnist

    tasks = ["mqar"]
    data_dir = str(tmp_path / "tfds")
    if shutil.which("bible"):
        tasks.append("lm")
    if fashion_mnist.local_source_available():
        data_dir = request.getfixturevalue("fashion_mnist_dir")
        tasks.append("pixels")
    out = tmp_path / "results"
    cmd = [sys.executable, "benchmarks/quality.py", "--quick", "--out", str(out)]
    cmd += ["--data-dir", data_dir, "--tasks", ",".join(tasks)]
    # This checkout's package, whatever copy is installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    cell = report["mqar"]["cells"][0]
    assert set(cell["kinds"]) == {"softmax", "linear-elu"}
    for result in cell["kinds"].values():
        assert 0 <= result["accuracy"] <= 1 and result["train_seconds"] > 0
        assert result["state"]["bytes"] > 0
    assert cell["kinds"]["softmax"]["state"]["grows_with_length"]
    assert not cell["kinds"]["linear-elu"]["state"]["grows_with_length"]
    if "lm" in tasks:
        assert all(0 < r["bits_per_char"] < 9 for r in report["lm"]["kinds"].values())
    if "pixels" in tasks:
        assert set(report["pixels"]["kinds"]) == {"softmax", "linear-elu"}
        assert all(0 < r["bits_per_dim"] < 9 for r in report["pixels"]["kinds"].values())
    assert report["targets"] == [{"target": "all", "status": "not evaluated (--quick)"}]
    table = (out / "quality.md").read_text()
    assert "| (32, 4) | 32 | softmax |" in table and "## Targets" in table
    assert (out / "mqar.png").stat().st_size > 1000


def test_merge_keeps_earlier_kinds_only_for_the_same_settings():
    import quality

    settings = {"side": 28, "steps": 2400, "batch_size": 8, "width": 128, "layers": 2}
    earlier = {**settings, "kinds": {"softmax": {"bits_per_dim": 3.0}, "gated": {"x": 1}}}
    task = {**settings, "kinds": {"gated": {"bits_per_dim": 2.9}}}
    quality._merge_kinds(task, earlier, "2026-11-30 12:31")
    assert list(task["kinds"]) == ["softmax", "gated"]  # the package's kind order
    assert task["kinds"]["softmax"] == {"bits_per_dim": 3.0, "merged_from": "2026-11-30 12:31"}
    assert task["kinds"]["gated"] == {"bits_per_dim": 2.9}  # this run's result wins
    other = {**settings, "steps": 800, "kinds": {"gated": {"bits_per_dim": 3.1}}}
    quality._merge_kinds(other, earlier, "2026-11-30 12:31")
    assert list(other["kinds"]) == ["gated"]


def test_merge_adds_earlier_mqar_cells_and_best_sweeps_and_the_table_says_so():
    import quality

    def result(accuracy, lr):
        run = {"lr": lr, "accuracy": accuracy}
        return {"accuracy": accuracy, "lr": lr, "runs": [run], "sweep_seconds": 1.0}

    def cell(seq_len, d_model, **kinds):
        return {
            "seq_len": seq_len,
            "num_kv_pairs": seq_len // 16,
            "d_model": d_model,
            "kinds": kinds,
        }

    settings = dict.fromkeys(quality._MQAR_KEYS, 1)
    earlier = {
        **settings,
        "learning_rates": [1e-3],
        "cells": [
            cell(128, 128, softmax=result(0.99, 1e-3)),
            cell(64, 64, softmax=result(0.98, 1e-3), gated=result(0.5, 1e-3)),
        ],
    }
    mqar = {
        **settings,
        "learning_rates": [3e-3],
        "cells": [cell(64, 64, softmax=result(0.43, 3e-3), gated=result(0.9, 3e-3))],
    }
    quality._merge_cells(mqar, earlier, "2026-11-30 10:55")
    assert [(c["seq_len"], c["d_model"]) for c in mqar["cells"]] == [(64, 64), (128, 128)]
    softmax, gated = mqar["cells"][0]["kinds"]["softmax"], mqar["cells"][0]["kinds"]["gated"]
    assert (softmax["accuracy"], softmax["merged_from"]) == (0.98, "2026-11-30 10:55")
    assert softmax["learning_rates"] == [1e-3, 3e-3] and len(softmax["runs"]) == 2
    assert gated["accuracy"] == 0.9 and "merged_from" not in gated  # this run's was better
    assert mqar["cells"][0]["softmax_learned"]
    assert quality._learning_rates(mqar) == "the learning rates below"
    notes = " ".join(quality._cell_notes(mqar))
    assert "(64, 4) d_model 64: [0.001, 0.003] for softmax, gated" in notes
    assert "(128, 8) d_model 128: [0.001] for softmax" in notes
    assert "(64, 4) d_model 64 (2026-11-30 10:55): softmax" in notes
    other = {**settings, "steps": 2, "learning_rates": [3e-3], "cells": []}
    quality._merge_cells(other, earlier, "2026-11-30 10:55")
    assert other["cells"] == []


def test_merge_keeps_when_a_merged_cell_was_measured():
    import quality

    settings = dict.fromkeys(quality._MQAR_KEYS, 1)
    result = {"accuracy": 1.0, "lr": 3e-3, "runs": [], "sweep_seconds": 1.0}
    old = {"seq_len": 128, "num_kv_pairs": 8, "d_model": 64, "kinds": {"gated": result}}
    earlier = {**settings, "learning_rates": [3e-3], "cells": [{**old, "merged_from": "10:55"}]}
    mqar = {**settings, "learning_rates": [1e-3], "cells": []}
    quality._merge_cells(mqar, earlier, "15:29")
    assert mqar["cells"][0]["kinds"]["gated"]["merged_from"] == "10:55"
    assert mqar["cells"][0]["kinds"]["gated"]["learning_rates"] == [3e-3]
