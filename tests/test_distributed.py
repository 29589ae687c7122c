"""tf.distribute: MirroredStrategy on 2 logical CPUs matches one device, and
two MultiWorkerMirroredStrategy workers on loopback agree on the weights.

Each run is a fresh process (`distributed_train.py`): logical devices and
TF_CONFIG must be set before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("distributed_train.py")
ROOT = SCRIPT.parents[1]


def _launch(kind, out, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), kind, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc, timeout=300):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("distributed training hung")
    assert proc.returncode == 0, output[-3000:]


def _load(path):
    report = json.loads(Path(path).read_text())
    weights = [[np.array(w) for w in report[key]] for key in ("weights", "initial_weights")]
    return report["replicas"], report["losses"], *weights


def _free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_mirrored_strategy_matches_one_device(tmp_path):
    procs = {kind: _launch(kind, tmp_path / f"{kind}.json") for kind in ("one", "mirrored")}
    for proc in procs.values():
        _wait(proc)
    replicas_one, losses_one, weights_one, _ = _load(tmp_path / "one.json")
    replicas_two, losses_two, weights_two, _ = _load(tmp_path / "mirrored.json")
    assert (replicas_one, replicas_two) == (1, 2)
    assert len(losses_one) == len(losses_two) == 12
    assert losses_one[-1] < losses_one[0]  # it trains
    # Same global batch, gradients averaged over replicas: the same curve.
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-4, atol=1e-5)
    for a, b in zip(weights_two, weights_one, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _run_two_workers(kind, tmp_path):
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {"TF_CONFIG": json.dumps(config)}
        procs.append(_launch(kind, tmp_path / f"worker{index}.json", env))
    for proc in procs:
        _wait(proc)
    return [_load(tmp_path / f"worker{i}.json") for i in (0, 1)]


def test_multi_worker_mirrored_workers_agree_and_match_one_device(tmp_path):
    """Two local workers (TF_CONFIG on loopback), a custom loop around
    `strategy.run`: identical weights on both, and the loss curve of one device."""
    one = _launch("one", tmp_path / "one.json")
    (r0, losses0, w0, init), (r1, losses1, w1, _) = _run_two_workers("multiworker_loop", tmp_path)
    _wait(one)
    _, losses_one, weights_one, _ = _load(tmp_path / "one.json")
    assert r0 == r1 == 2
    assert losses0 == losses1 and len(losses0) == 12
    for a, b in zip(w0, w1, strict=True):
        np.testing.assert_array_equal(a, b)  # all-reduced: bit-identical updates
    assert any(np.any(a != b) for a, b in zip(w0, init, strict=True))  # they trained
    # `fit` logs the running mean of the epoch's step losses.
    running_mean = np.cumsum(losses0) / np.arange(1, len(losses0) + 1)
    np.testing.assert_allclose(running_mean, losses_one, rtol=1e-4, atol=1e-5)
    for a, b in zip(w0, weights_one, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.xfail(
    strict=True,
    reason="Keras 3.15's fit fails under MultiWorkerMirroredStrategy (TF 2.21) before the "
    "first step with 'Attempt to convert a value (PerReplica...) ... to a Tensor', also "
    "for a plain Dense model; strict, so a fixed Keras shows up here.",
)
def test_multi_worker_model_fit(tmp_path):
    _run_two_workers("multiworker", tmp_path)


def test_jax_data_parallel_matches_one_device(tmp_path):
    """`keras.distribution.DataParallel` over two JAX host devices: the loss
    curve and the weights of one device (same global batch)."""
    pytest.importorskip("jax")
    out = tmp_path / "jax.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    script = SCRIPT.with_name("jax_data_parallel.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait(proc)
    report = json.loads(out.read_text())
    assert report["devices"] == 2
    one, two = report["one"], report["data_parallel"]
    assert one["losses"][-1] < one["losses"][0]  # it trains
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, atol=1e-5)
    for a, b in zip(two["weights"], one["weights"], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-5)
