"""SavedModel and TFLite exports run without this package and match Keras."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_linear_attention import build_causal_lm, build_sequence_classifier
from keras_linear_attention.export import (
    builtin_ops,
    convert_to_tflite,
    export_bundle,
    export_saved_model,
    parity,
)

# Runs in a fresh interpreter that never imports keras_linear_attention.
FRESH_PROCESS = """
import json, sys
import numpy as np, tensorflow as tf
path, x_path, out_path = sys.argv[1:4]
x = np.load(x_path)
sigs = tf.saved_model.load(path).signatures
out = {"serve": sigs["serve"](tf.constant(x))["logits"].numpy()}
if "step" in sigs:
    states = {k: v for k, v in sigs["prefill"](token_ids=tf.constant(x[:, :-1])).items()
              if k != "logits"}
    step = sigs["step"](token=tf.constant(x[:, -1]), index=tf.constant(x.shape[1] - 1), **states)
    out["step"] = step["logits"].numpy()
assert "keras_linear_attention" not in sys.modules
np.savez(out_path, **out)
"""


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(3)
    return build_sequence_classifier(5, feature_dim=6, sequence_length=64, hidden_dim=16)


@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(4)
    return build_causal_lm(31, sequence_length=512, hidden_dim=16, num_heads=2)


@pytest.fixture(scope="module")
def lm_export(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_bundle")
    x = parity.sample_inputs(lm, length=40)
    return export_bundle(lm, str(out), sample=x), out, x


def _fresh_process_outputs(tmp_path, saved_model, x):
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    out = tmp_path / "out.npz"
    subprocess.run(
        [sys.executable, str(script), saved_model, str(tmp_path / "x.npy"), str(out)], check=True
    )
    return np.load(out)


def test_classifier_saved_model_in_fresh_process(tmp_path, classifier):
    path = str(tmp_path / "sm")
    assert export_saved_model(classifier, path) == ["serve"]
    x = parity.sample_inputs(classifier, batch=3, length=21)
    out = _fresh_process_outputs(tmp_path, path, x)
    np.testing.assert_allclose(out["serve"], classifier(x), atol=1e-5)


def test_lm_saved_model_in_fresh_process(tmp_path, lm, lm_export):
    _, out_dir, x = lm_export
    out = _fresh_process_outputs(tmp_path, str(out_dir / "saved_model"), x)
    expected = np.asarray(lm(x))
    np.testing.assert_allclose(out["serve"], expected, atol=1e-5)
    np.testing.assert_allclose(out["step"], expected[:, -1], atol=1e-5)


def _step_with_index(lm_export, index):
    """The SavedModel `step` at `index` after a prefill of all but the last token."""
    _, out_dir, x = lm_export
    sigs = tf.saved_model.load(str(out_dir / "saved_model")).signatures
    states = sigs["prefill"](token_ids=tf.constant(x[:, :-1]))
    states = {k: v.numpy() for k, v in states.items() if k != "logits"}
    return sigs["step"](token=tf.constant(x[:, -1]), index=tf.constant(index), **states), states


@pytest.mark.parametrize("index", [-1, 512])
def test_saved_model_step_refuses_an_index_outside_the_positions(lm_export, index):
    """-1 used to wrap to the last position; 512 failed inside a Gather."""
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`start_index`.*sequence_length=512"):
        _step_with_index(lm_export, index)


def test_saved_model_step_names_a_state_of_another_batch(lm_export):
    """States for one batch size with tokens of another: the graph assertion
    names the state (it was "Incompatible shapes" deep inside TF)."""
    _, out_dir, x = lm_export
    sigs = tf.saved_model.load(str(out_dir / "saved_model")).signatures
    states = sigs["prefill"](token_ids=tf.constant(x[:, :-1]))
    states = {k: v for k, v in states.items() if k != "logits"}
    token = tf.constant(np.concatenate([x[:, -1], x[:, -1]]))  # twice the batch
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`initial_state\[0\] \(kv\)`"):
        sigs["step"](token=token, index=tf.constant(x.shape[1] - 1), **states)


@pytest.mark.parametrize("index", [-1, 512])
def test_tflite_step_gives_nan_for_an_index_outside_the_positions(lm_export, index):
    """TFLite drops the assertion; the NaN factor still makes the result loud."""
    _, out_dir, x = lm_export
    expected, states = _step_with_index(lm_export, x.shape[1] - 1)
    interpreter = parity.tflite_runner((out_dir / "step.float32.tflite").read_bytes())
    step = interpreter.get_signature_runner("step")
    good = step(token=x[:, -1], index=np.asarray(x.shape[1] - 1, np.int32), **states)
    np.testing.assert_allclose(good["logits"], expected["logits"], atol=1e-4)
    bad = step(token=x[:, -1], index=np.asarray(index, np.int32), **states)
    assert np.all(np.isnan(bad["logits"]))


def test_saved_model_cli_lists_signatures(lm_export):
    _, out_dir, _ = lm_export
    shown = subprocess.run(
        ["saved_model_cli", "show", "--dir", str(out_dir / "saved_model"), "--all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("serve", "prefill", "step"):
        assert f"signature_def['{name}']" in shown
    for tensor in ("token_ids", "token", "index", "kv_0", "k_sum_1", "logits"):
        assert f"['{tensor}']" in shown


# Tolerances documented in the README "Deploy" section.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 2e-1}


def test_lm_bundle_files_match_keras(lm_export):
    summary, out_dir, _ = lm_export
    assert summary["saved_model"]["signatures"] == ["serve", "prefill", "step"]
    assert max(summary["saved_model"]["max_abs_error"].values()) < 1e-5
    assert set(summary["tflite"]) == {f"{k}.{q}" for k in ("serve", "step") for q in TOLERANCE}
    for name, info in summary["tflite"].items():
        assert info["max_abs_error"] < TOLERANCE[name.split(".")[1]], (name, info)
        assert not any(op.startswith("Flex") or op == "CUSTOM" for op in info["ops"])
    assert json.loads((out_dir / "summary.json").read_text()) == summary
    sizes = {q: summary["tflite"][f"serve.{q}"]["bytes"] for q in TOLERANCE}
    assert sizes["int8"] < sizes["float32"] and sizes["float16"] < sizes["float32"]


def test_tflite_classifier_resizes_to_any_length(tmp_path, classifier):
    path = str(tmp_path / "sm")
    export_saved_model(classifier, path)
    flatbuffer = convert_to_tflite(path, "serve")
    for length in (1, 7, 64):
        x = parity.sample_inputs(classifier, batch=2, length=length, seed=length)
        assert parity.tflite_serve_error(classifier, flatbuffer, x) < 1e-4


def test_causal_tflite_has_no_quadratic_tensor(lm_export):
    """After running at N = 512 (chunk 64), no tensor is anywhere near N×N."""
    _, out_dir, _ = lm_export
    interpreter = parity.tflite_runner((out_dir / "serve.float32.tflite").read_bytes())
    n = 512
    interpreter.get_signature_runner("serve")(token_ids=np.ones((1, n), np.int32))
    largest = max(int(np.prod(t["shape"])) for t in interpreter.get_tensor_details())
    assert largest < n * n / 4, largest


def test_xla_compiled_model_exports(tmp_path, classifier):
    classifier.compile("adam", "mse", jit_compile=True)
    x = parity.sample_inputs(classifier)
    classifier.predict(x, verbose=0)
    path = str(tmp_path / "sm")
    export_saved_model(classifier, path)
    assert parity.saved_model_errors(classifier, path, x)["serve"] < 1e-5
    ops = builtin_ops(convert_to_tflite(path, "serve"))
    assert "BATCH_MATMUL" in ops


def test_builtin_ops_sees_flex_ops_and_every_subgraph():
    """The audit behind "builtins only": a Flex op shows as CUSTOM, and the
    ops inside an IF's branches (a dynamic length's two paths) are listed."""

    @tf.function(input_signature=[tf.TensorSpec((4, 4), tf.float32)])
    def flex(x):
        return tf.linalg.inv(x) + tf.nn.relu(x)

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    def branches(x):
        return tf.cond(tf.shape(x)[0] > 2, lambda: tf.nn.relu(x), lambda: tf.tanh(x))

    def convert(fn, select):
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [fn.get_concrete_function()], fn
        )
        if select:
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS,
                tf.lite.OpsSet.SELECT_TF_OPS,
            ]
        return converter.convert()

    assert "CUSTOM" in builtin_ops(convert(flex, select=True))
    assert {"IF", "RELU", "TANH"} <= set(builtin_ops(convert(branches, select=False)))


def test_command_line_export(tmp_path, classifier):
    model_path = tmp_path / "tiny.keras"
    classifier.save(model_path)
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "keras_linear_attention.export", str(model_path)]
        + ["--out", str(out), "--quantize", "float32", "int8"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "signatures: serve" in result.stdout
    assert "TFLite operators (all builtin)" in result.stdout
    assert sorted(p.name for p in out.glob("*.tflite")) == [
        "serve.float32.tflite",
        "serve.int8.tflite",
    ]


def test_rotary_lm_exports_and_steps_on_litert(tmp_path):
    """Rotary embeddings: the step signature takes the position; SavedModel
    and TFLite (builtins only) match Keras."""
    keras.utils.set_random_seed(5)
    model = build_causal_lm(31, hidden_dim=16, num_heads=2, position="rotary")
    x = parity.sample_inputs(model, length=12)
    summary = export_bundle(model, str(tmp_path), quantizations=("float32",), sample=x)
    assert max(summary["saved_model"]["max_abs_error"].values()) < 1e-5
    assert sorted(summary["tflite"]) == ["serve.float32", "step.float32"]
    for name, info in summary["tflite"].items():
        assert info["max_abs_error"] < TOLERANCE["float32"], (name, info)
        assert not any(op.startswith("Flex") or op == "CUSTOM" for op in info["ops"])


@pytest.mark.parametrize("recurrence", ["retention", "gated", "delta", "gated_delta"])
def test_recurrence_lm_exports_and_steps_on_litert(tmp_path, recurrence):
    """Each recurrence's LM: SavedModel serve/prefill/step match Keras; the
    TFLite `step` (builtins only), fed token by token, matches Keras; the
    TFLite `serve` too, except for the delta rule, whose skip says why."""
    keras.utils.set_random_seed(5)
    model = build_causal_lm(
        31, sequence_length=64, hidden_dim=16, num_heads=2, attention=recurrence
    )
    x = parity.sample_inputs(model, length=12)
    # int8 once (its conversion is the slow part); the float32 files for all.
    quantizations = ("float32", "int8") if recurrence == "gated_delta" else ("float32",)
    summary = export_bundle(model, str(tmp_path), quantizations=quantizations, sample=x)
    assert summary["saved_model"]["signatures"] == ["serve", "prefill", "step"]
    assert max(summary["saved_model"]["max_abs_error"].values()) < 1e-5
    keys = ["step"] if "delta" in recurrence else ["serve", "step"]
    assert sorted(summary["tflite"]) == sorted(f"{k}.{q}" for k in keys for q in quantizations)
    for name, info in summary["tflite"].items():
        assert info["max_abs_error"] < TOLERANCE[name.split(".")[1]], (name, info)
        assert not any(op.startswith("Flex") or op == "CUSTOM" for op in info["ops"])
    if "delta" in recurrence:
        assert "delta rule" in summary["tflite_skipped"]["serve"]
