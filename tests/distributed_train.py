"""Train a small causal LM under a tf.distribute strategy; used by
test_distributed.py, one fresh process per run (devices are set at startup).

    python tests/distributed_train.py one OUT.json
    python tests/distributed_train.py mirrored OUT.json      # 2 logical CPUs
    TF_CONFIG=... python tests/distributed_train.py multiworker OUT.json
    TF_CONFIG=... python tests/distributed_train.py multiworker_loop OUT.json

`multiworker` trains with `model.fit`; `multiworker_loop` with a custom loop
around `strategy.run`, which works where Keras 3.15's `fit` does not (it
fails before the first step, also for a plain Dense model).

Writes the per-step losses and the final weights (as lists) to OUT.json.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_linear_attention as kla  # noqa: E402

GLOBAL_BATCH, STEPS, LENGTH, VOCAB = 16, 12, 32, 16


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def strategy_for(kind: str):
    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        logical = [tf.config.LogicalDeviceConfiguration()] * 2
        tf.config.set_logical_device_configuration(cpu, logical)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if kind.startswith("multiworker"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def dataset():
    rng = np.random.default_rng(0)
    tokens = np.repeat(rng.integers(0, VOCAB, (GLOBAL_BATCH * STEPS, LENGTH // 2 + 1)), 2, axis=1)
    ds = tf.data.Dataset.from_tensor_slices((tokens[:, :LENGTH], tokens[:, 1 : LENGTH + 1]))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.batch(GLOBAL_BATCH).with_options(options)


def custom_loop(strategy, model) -> list:
    """SGD steps with per-replica gradients all-reduced by the optimizer."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            per_token = tf.reduce_mean(loss_fn(y, model(x, training=True)), axis=-1)
            loss = tf.nn.compute_average_loss(per_token, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", per_replica, axis=None)

    batches = strategy.experimental_distribute_dataset(dataset())
    return [float(train_step(batch)) for batch in batches]


def main(kind: str, out_path: str) -> None:
    strategy = strategy_for(kind)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = kla.build_causal_lm(
            VOCAB, sequence_length=LENGTH, hidden_dim=16, num_layers=1, num_heads=2
        )
        model.compile(
            keras.optimizers.SGD(0.5),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    initial = model.get_weights()
    if kind == "multiworker_loop":
        losses = custom_loop(strategy, model)
    else:
        callback = StepLosses()
        model.fit(dataset(), epochs=1, verbose=0, callbacks=[callback])
        losses = callback.losses
    report = {
        "replicas": strategy.num_replicas_in_sync,
        "losses": losses,
        "weights": [w.tolist() for w in model.get_weights()],
        "initial_weights": [w.tolist() for w in initial],
    }
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
