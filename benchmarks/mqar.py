"""Multi-query associative recall (MQAR), the Zoology generator in vectorised NumPy.

Zoology (Arora et al. 2023, `zoology/data/associative_recall.py`): each example
starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...`, keys drawn from
`[1, V/2)` and values from `[V/2, V)`, distinct within the example. Every key
is then queried once in the rest of the sequence: the query region has
`(T − 2·KV) / 2` even slots, and key i sits in slot `g_i`, the slots drawn
without replacement with `p(g) ∝ g^(a−1)` (g = 1, 2, ...; a = 0.01), so most
queries come soon after the context. The label at a query position is the key's
value (what the model must predict next); every other label is −100 (ignored).
Empty positions are filled with random tokens from the whole vocabulary, as
Zoology does (`random_non_queries`).

Zoology draws with `np.random.choice` row by row; this draws the same
distributions for a whole batch at once (distinct keys/values by sorting random
numbers, the weighted draw without replacement by the Efraimidis-Spirakis keys
`log(u) / p`, largest first), so 100k examples of length 128 take well under a
second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100


@dataclass
class MQAR:
    """One generated set.

    Attributes:
        inputs: `(B, T)` int32 token ids.
        labels: `(B, T)` int32: the paired value at each query position,
            `IGNORE` (−100) elsewhere.
        positions: `(B, KV)` int32 query positions, in the order of the pairs.
        targets: `(B, KV)` int32 values to predict at `positions`
            (`labels` gathered there).
        keys, values: `(B, KV)` int32, the pairs in context order.
    """

    inputs: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    keys: np.ndarray
    values: np.ndarray


def check_config(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
    for name, value in (
        ("seq_len", seq_len),
        ("num_kv_pairs", num_kv_pairs),
        ("vocab_size", vocab_size),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"MQAR needs 4·num_kv_pairs ≤ seq_len (the context holds 2·KV tokens and the "
            f"query region needs KV distinct even slots); received seq_len={seq_len}, "
            f"num_kv_pairs={num_kv_pairs} (4·KV = {4 * num_kv_pairs})."
        )
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"`vocab_size`={vocab_size} leaves {max(vocab_size // 2 - 1, 0)} keys in "
            f"[1, V/2): too few for {num_kv_pairs} distinct keys per example."
        )


def _distinct(rng: np.random.Generator, count: int, low: int, high: int, size: int):
    """`(count, size)` ints from `[low, high)`, distinct within each row, in
    random order (a random permutation's first `size` entries)."""
    order = np.argsort(rng.random((count, high - low)), axis=1)[:, :size]
    return (order + low).astype(np.int32)


def gap_probabilities(num_slots: int, power_a: float = 0.01) -> np.ndarray:
    """`p(g) ∝ a·g^(a−1)` over the query slots g = 1 … num_slots (Zoology)."""
    g = np.arange(1, num_slots + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def _weighted_without_replacement(rng, count: int, p: np.ndarray, size: int) -> np.ndarray:
    """`(count, size)` slot indices drawn without replacement with weights `p`,
    distributed as successive `np.random.choice(len(p), size, replace=False, p=p)`."""
    scores = np.log(rng.random((count, len(p)))) / p  # Efraimidis-Spirakis, in logs
    return np.argsort(-scores, axis=1)[:, :size]


def generate(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> MQAR:
    """Generate `num_examples` MQAR sequences of length `seq_len`.

    Example:

    >>> data = generate(2, seq_len=16, num_kv_pairs=2, vocab_size=32, seed=0)
    >>> data.inputs.shape, data.positions.shape
    ((2, 16), (2, 2))
    >>> bool((data.labels[0, data.positions[0]] == data.values[0]).all())
    True
    """
    check_config(seq_len, num_kv_pairs, vocab_size)
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"`num_examples` must be a positive int; received {num_examples!r}.")
    rng = np.random.default_rng(seed)
    n, kv, half = int(num_examples), int(num_kv_pairs), vocab_size // 2
    keys = _distinct(rng, n, 1, half, kv)
    values = _distinct(rng, n, half, vocab_size, kv)
    context = 2 * kv
    slots = _weighted_without_replacement(
        rng, n, gap_probabilities((seq_len - context) // 2, power_a), kv
    )
    positions = (context + 2 * slots).astype(np.int32)
    rows = np.arange(n)[:, None]
    inputs = np.zeros((n, seq_len), np.int32)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs[rows, positions] = keys
    labels = np.full((n, seq_len), IGNORE, np.int32)
    labels[rows, positions] = values
    if random_non_queries:
        empty = inputs == 0  # keys ≥ 1 and values ≥ V/2: only unused slots are 0
        noise = rng.integers(0, vocab_size, size=inputs.shape, dtype=np.int32)
        inputs = np.where(empty, noise, inputs)
    return MQAR(inputs, labels, positions, values.copy(), keys, values)
