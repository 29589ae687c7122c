"""Train a small causal LM on JAX with one device and with
`keras.distribution.DataParallel` over two host devices; used by
test_distributed.py (a fresh process: the device count is fixed when JAX
starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/jax_data_parallel.py OUT.json

Writes both runs' per-epoch losses and final weights (as lists) to OUT.json.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_linear_attention as kla  # noqa: E402

BATCH, LENGTH, VOCAB, EPOCHS = 8, 16, 16, 4


def train(distribution) -> dict:
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(0)
    model = kla.build_causal_lm(VOCAB, sequence_length=LENGTH, hidden_dim=16, num_heads=2)
    model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    tokens = np.random.default_rng(0).integers(0, VOCAB, (4 * BATCH, LENGTH + 1))
    history = model.fit(
        tokens[:, :-1], tokens[:, 1:], batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0
    )
    weights = [keras.ops.convert_to_numpy(w).tolist() for w in model.weights]
    return {"losses": history.history["loss"], "weights": weights}


if __name__ == "__main__":
    devices = jax.devices("cpu")
    report = {
        "devices": len(devices),
        "one": train(None),
        "data_parallel": train(keras.distribution.DataParallel(devices=devices)),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
