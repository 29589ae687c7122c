"""What every one-configuration benchmark process shares: the layer shapes,
the memory cap, peak memory, and the command line (a JSON configuration in,
one `RESULT {json}` line out; see suite.py)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

# The layer: model dim 512, 8 heads of 64, batch 1, float32.
HEADS, KEY_DIM, MODEL_DIM = 8, 64, 512


def limit_memory(gib: float) -> None:
    """Cap the address space, so runaway allocations (softmax's N×N scores)
    fail inside this process instead of swapping the machine."""
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(run) -> None:
    """`python SCRIPT '{json config}'`: measure, print the result line."""
    config = json.loads(sys.argv[1])
    limit_memory(config.get("memory_limit_gib", 16))
    print("RESULT " + json.dumps(run(config)), flush=True)


def run(cmd: list, cfg: dict, timeout: float) -> dict:
    """Run a `main`-style script in a fresh process: its `RESULT` line, or
    `cfg` with a status saying why there is none (its failure is a result)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cfg, "status": f"timeout (> {timeout:.0f} s)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    reason = "killed (out of memory?)" if proc.returncode < 0 else "error"
    return {
        **cfg,
        "status": f"{reason}: rc {proc.returncode}: {proc.stderr.strip()[-300:]}",
        # The largest peak of any child so far: this one's when it is the largest.
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
