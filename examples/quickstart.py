"""Both layers in a few lines each, end to end on CPU in under a minute.

1. A small Transformer classifier with `LinearMultiHeadAttention` trained
   with `model.fit` (a synthetic task: does the sequence contain token 7?).
2. `CausalLinearAttention` as an RNN: prefill a prompt, then step one token
   at a time, checking the steps against the parallel computation.

    python examples/quickstart.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_linear_attention as kla  # noqa: E402


def classifier(length=64, vocab=16, dim=32):
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim, mask_zero=True)(tokens)
    for _ in range(2):
        attn = kla.LinearMultiHeadAttention(num_heads=4, key_dim=dim // 4)(x, x)
        x = keras.layers.LayerNormalization()(x + attn)
        ff = keras.layers.Dense(dim, activation="gelu")(x)
        x = keras.layers.LayerNormalization()(x + ff)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(x))


def train_classifier():
    rng = np.random.default_rng(0)
    x = rng.choice([t for t in range(1, 16) if t != 7], size=(4000, 64))
    y = rng.integers(0, 2, size=4000)  # balanced classes
    x[y == 1, rng.integers(0, 64, size=int(y.sum()))] = 7  # one 7 somewhere
    model = classifier()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:3200], y[:3200], batch_size=64, epochs=4, validation_split=0.1)
    loss, acc = model.evaluate(x[3200:], y[3200:], verbose=0)
    print(f"held-out accuracy {acc:.3f} (majority class {max(y.mean(), 1 - y.mean()):.3f})")


def generate_with_state():
    layer = kla.CausalLinearAttention(num_heads=4, key_dim=16)
    seq = keras.random.normal((1, 40, 64), seed=0)
    parallel = layer(seq)  # all 40 positions at once
    out, state = layer(seq[:, :30], return_state=True)  # prefill the prompt
    steps = [out]
    for t in range(30, 40):  # constant cost per token
        out, state = layer(seq[:, t : t + 1], initial_state=state, return_state=True)
        steps.append(out)
    err = np.max(np.abs(np.concatenate(steps, 1) - np.asarray(parallel)))
    print(f"prefill+step vs parallel: max abs difference {err:.2e}")


if __name__ == "__main__":
    train_classifier()
    generate_with_state()
