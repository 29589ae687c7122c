"""One check for every public layer, after keras-hub's `TestCase.run_layer_test`.

`run_layer_test(cls, init_kwargs, inputs, expected_output_shape)` builds and
calls the layer and checks, in turn (each can be turned off where it does not
apply, e.g. `run_training=False` for a layer without trainable weights):

- build: `layer.build(...)` from the input shapes gives a built layer (with
  `expected_num_trainable_weights` / `expected_num_non_trainable_weights`
  when given);
- symbolic and eager calls: the output structure, shapes and dtype (the
  layer's compute dtype unless `expected_output_dtype` says otherwise) are
  the expected ones, the eager output is finite, and `compute_output_spec`
  (and `compute_output_shape`, where the class defines it) agree with it;
- `run_serialization_test`: `get_config` / `from_config` and
  `serialize_keras_object` round trips give the same config, and the revived
  layer, given the same weights, gives identical outputs;
- `run_saving_test`: a functional model around the layer survives a `.keras`
  save and load with identical outputs;
- `run_training_test`: a few `model.fit` steps with `jit_compile=True` (on
  the first output) change every trainable weight;
- `run_precision_test`: with `dtype="mixed_float16"` on the layer (the global
  policy left at float32), the policy reaches every sublayer, the float
  variables stay float32, and the output is float16 and finite.

`inputs` is one input or a dict of call arguments (`{"query": ..., "value":
...}`); each is a shape tuple (random normal float32 data, seeded) or an
array used as is. `call_kwargs` are further non-tensor call arguments
(`use_causal_mask=True`). Shapes stay tiny: every case runs in about a second.
"""

import json

import keras
import numpy as np
from keras import ops, tree

PRECISION_POLICY = "mixed_float16"
TRAINING_STEPS = 3


def _numpy(x):
    return tree.map_structure(lambda t: np.asarray(ops.convert_to_numpy(t)), x)


def make_inputs(inputs, seed=0):
    """Shape tuples -> seeded float32 arrays; arrays are kept as they are."""
    rng = np.random.default_rng(seed)

    def one(x):
        if isinstance(x, tuple):
            return rng.normal(size=x).astype("float32")
        return np.asarray(x)

    if isinstance(inputs, dict):
        return {name: one(x) for name, x in inputs.items()}
    return one(inputs)


def call_layer(layer, inputs, call_kwargs=None):
    """`layer(inputs)` or `layer(**inputs)`, with `call_kwargs`."""
    call_kwargs = call_kwargs or {}
    if isinstance(inputs, dict):
        return layer(**inputs, **call_kwargs)
    return layer(inputs, **call_kwargs)


def _symbolic(inputs):
    return tree.map_structure(lambda x: keras.KerasTensor(x.shape, x.dtype), inputs)


def _shapes(outputs):
    return tree.map_structure(lambda x: tuple(x.shape), outputs)


def _as_shapes(x):
    """A shape, or a structure of shapes, as tuples (a shape: ints and None)."""
    if all(d is None or isinstance(d, int) for d in x):
        return tuple(x)
    return type(x)(_as_shapes(s) for s in x)


def _is_float(dtype):
    return "float" in keras.backend.standardize_dtype(dtype)


def _assert_identical(actual, expected, what):
    actual, expected = tree.flatten(_numpy(actual)), tree.flatten(_numpy(expected))
    assert len(actual) == len(expected), what
    for a, b in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=what)


def _assert_outputs(layer, outputs, expected_shape, expected_dtype, what):
    expected_shape = _as_shapes(expected_shape)
    assert _shapes(outputs) == expected_shape, (what, _shapes(outputs), expected_shape)
    dtype = keras.backend.standardize_dtype(expected_dtype or layer.compute_dtype)
    first = tree.flatten(outputs)[0]
    assert keras.backend.standardize_dtype(first.dtype) == dtype, (what, first.dtype, dtype)


def _assert_finite(outputs, what):
    for x in tree.flatten(_numpy(outputs)):
        if _is_float(x.dtype):
            assert np.all(np.isfinite(x.astype("float64"))), f"{what}: non-finite values"


def _build_shapes(inputs):
    if isinstance(inputs, dict):
        return {f"{name}_shape": x.shape for name, x in inputs.items()}
    return inputs.shape


def run_serialization_test(layer, inputs, call_kwargs=None):
    """Config round trips give the same config; the revived layer, with the
    same weights, gives identical outputs. `layer` must be built (called)."""
    cls = type(layer)
    config_json = json.dumps(layer.get_config(), sort_keys=True)
    revived = cls.from_config(layer.get_config())
    assert json.dumps(revived.get_config(), sort_keys=True) == config_json
    serialized = json.dumps(keras.saving.serialize_keras_object(layer), sort_keys=True)
    again = keras.saving.deserialize_keras_object(json.loads(serialized))
    assert type(again) is cls
    assert json.dumps(again.get_config(), sort_keys=True) == config_json

    expected = call_layer(layer, inputs, call_kwargs)
    call_layer(revived, inputs, call_kwargs)  # builds it
    revived.set_weights(layer.get_weights())
    _assert_identical(call_layer(revived, inputs, call_kwargs), expected, "from_config")


def _functional_model(layer, inputs, call_kwargs=None):
    def keras_input(name, x):
        return keras.Input(batch_shape=x.shape, dtype=x.dtype, name=name)

    if isinstance(inputs, dict):
        symbolic = {name: keras_input(name, x) for name, x in inputs.items()}
    else:
        symbolic = keras_input("inputs", inputs)
    return keras.Model(symbolic, call_layer(layer, symbolic, call_kwargs))


def run_saving_test(layer, inputs, path, call_kwargs=None):
    """A functional model around `layer` through `.keras`: identical outputs."""
    model = _functional_model(layer, inputs, call_kwargs)
    expected = model(inputs)
    model.save(path)
    loaded = keras.saving.load_model(path)
    _assert_identical(loaded(inputs), expected, ".keras round trip")


def run_training_test(cls, init_kwargs, inputs, call_kwargs=None, steps=TRAINING_STEPS):
    """`steps` steps of `model.fit` (jit_compile=True, MSE to random targets on
    the first output) change every trainable weight of a fresh layer."""
    layer = cls(**init_kwargs)
    outputs = call_layer(layer, inputs, call_kwargs)
    symbolic = _functional_model(layer, inputs, call_kwargs)
    model = keras.Model(symbolic.inputs, tree.flatten(symbolic.outputs)[0])
    assert layer.trainable_weights, f"{cls.__name__} has no trainable weights"
    before = {w.path: np.array(w.numpy()) for w in layer.trainable_weights}
    target = np.random.default_rng(1).normal(size=tree.flatten(outputs)[0].shape)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
    batch = tree.flatten(inputs)[0].shape[0]
    history = model.fit(
        inputs, target.astype("float32"), batch_size=batch, epochs=steps, verbose=0
    ).history
    assert np.all(np.isfinite(history["loss"])), history
    unchanged = [
        w.path for w in layer.trainable_weights if np.array_equal(w.numpy(), before[w.path])
    ]
    assert not unchanged, f"fit left these trainable weights unchanged: {unchanged}"


def run_precision_test(
    cls, init_kwargs, inputs, call_kwargs=None, policy=PRECISION_POLICY, output_dtype=None
):
    """`dtype=policy` on the layer alone: it reaches every sublayer, float
    variables stay in the variable dtype, outputs (eager and symbolic) are in
    the compute dtype (or `output_dtype`, for a layer documented to compute
    in float32 under mixed precision) and finite."""
    policy = keras.DTypePolicy(policy)
    layer = cls(**init_kwargs, dtype=policy)
    outputs = call_layer(layer, inputs, call_kwargs)
    spec = call_layer(layer, _symbolic(inputs), call_kwargs)  # autocasts, as a real call
    assert keras.config.dtype_policy().name == "float32", "the global policy changed"
    first, first_spec = tree.flatten(outputs)[0], tree.flatten(spec)[0]
    output_dtype = output_dtype or policy.compute_dtype
    assert keras.backend.standardize_dtype(first.dtype) == output_dtype, first.dtype
    assert keras.backend.standardize_dtype(first_spec.dtype) == output_dtype, first_spec.dtype
    _assert_finite(outputs, policy.name)
    floats = {w.path: w.dtype for w in layer.weights if _is_float(w.dtype)}
    wrong = {p: d for p, d in floats.items() if d != policy.variable_dtype}
    assert not wrong, f"variables not in {policy.variable_dtype}: {wrong}"
    subs = layer._flatten_layers(include_self=False, recursive=True)
    wrong = {s.path or s.name: s.dtype_policy.name for s in subs if s.dtype_policy != policy}
    assert not wrong, f"sublayers without the layer's policy: {wrong}"


def run_layer_test(
    cls,
    init_kwargs,
    inputs,
    expected_output_shape,
    *,
    call_kwargs=None,
    expected_output_dtype=None,
    expected_num_trainable_weights=None,
    expected_num_non_trainable_weights=None,
    run_build=True,
    run_serialization=True,
    run_saving=True,
    run_training=True,
    run_precision=True,
    precision_output_dtype=None,
    tmp_path=None,
):
    """All the checks above for `cls(**init_kwargs)` called on `inputs`.

    `expected_output_shape` is a shape tuple, or a structure of them for a
    layer returning several tensors. `precision_output_dtype` is the output
    dtype under mixed_float16 where it is not the compute dtype (float16).
    `tmp_path` (pytest's fixture) is where the `.keras` file goes; required
    unless `run_saving=False`.
    """
    keras.utils.set_random_seed(0)
    inputs = make_inputs(inputs)
    call_kwargs = call_kwargs or {}

    def check_weights(layer):
        if expected_num_trainable_weights is not None:
            assert len(layer.trainable_weights) == expected_num_trainable_weights, [
                w.path for w in layer.trainable_weights
            ]
        if expected_num_non_trainable_weights is not None:
            assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights, [
                w.path for w in layer.non_trainable_weights
            ]

    if run_build:
        layer = cls(**init_kwargs)
        shapes = _build_shapes(inputs)
        layer.build(**shapes) if isinstance(shapes, dict) else layer.build(shapes)
        assert layer.built
        check_weights(layer)

    # Symbolic call: shapes and dtype without running anything.
    layer = cls(**init_kwargs)
    symbolic_outputs = call_layer(layer, _symbolic(inputs), call_kwargs)
    _assert_outputs(
        layer, symbolic_outputs, expected_output_shape, expected_output_dtype, "symbolic"
    )
    check_weights(layer)

    # Eager call, and the shape inference agreeing with it.
    layer = cls(**init_kwargs)
    outputs = call_layer(layer, inputs, call_kwargs)
    _assert_outputs(layer, outputs, expected_output_shape, expected_output_dtype, "eager")
    _assert_finite(outputs, "eager")
    check_weights(layer)
    spec = call_layer(layer.compute_output_spec, _symbolic(inputs), call_kwargs)
    assert _shapes(spec) == _shapes(outputs), ("compute_output_spec", _shapes(spec))
    if type(layer).compute_output_shape is not keras.layers.Layer.compute_output_shape:
        shapes = _build_shapes(inputs)
        if isinstance(shapes, dict):
            shape = layer.compute_output_shape(*shapes.values())
        else:
            shape = layer.compute_output_shape(shapes)
        assert _as_shapes(shape) == _shapes(outputs), ("compute_output_shape", shape)

    if run_serialization:
        run_serialization_test(layer, inputs, call_kwargs)
    if run_saving:
        assert tmp_path is not None, "run_saving needs tmp_path"
        run_saving_test(layer, inputs, str(tmp_path / f"{cls.__name__}.keras"), call_kwargs)
    if run_training:
        run_training_test(cls, init_kwargs, inputs, call_kwargs)
    if run_precision:
        run_precision_test(
            cls, init_kwargs, inputs, call_kwargs, output_dtype=precision_output_dtype
        )
