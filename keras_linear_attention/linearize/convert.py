"""`linearize`: the same model with linear attention in place of softmax.

How (exact and simple, in two passes):

1. Rebuild the structure with every softmax attention layer swapped.
   Functional and Sequential models go through `keras.models.clone_model`
   with a `clone_function`, so every recorded call is replayed on the new
   layers with its arguments (`use_causal_mask=True`, masks) unchanged;
   nested models recurse. A `keras.layers.MultiHeadAttention` becomes a
   `LinearMultiHeadAttention` from the same config plus φ. A
   `LinearTransformerDecoder`/`Encoder` built with `attention="softmax"` is
   rebuilt from its config with linear attention (or the recurrence), so it
   saves, reloads and, as a decoder, generates recurrently. Any other layer
   holding attention layers as attributes is rebuilt from its config and
   those attributes are swapped in the slot the old one had in Keras's
   tracking order. Every other layer is rebuilt from its config.
   keras-hub (imported only when a layer comes from it): a
   `TransformerDecoder`/`Encoder` becomes `kla.hub`'s from its config, a
   `GPT2Backbone` becomes `LinearGPT2Backbone` from its config and a
   `GPT2CausalLM` a `LinearGPT2CausalLM` over the converted backbone (the
   same preprocessor); these keep keras-hub's weight order.
2. Copy the original's weights, in order, onto the result's weights that
   are not new. Keras lists weights in tracking (creation) order, and a
   linear attention layer has its softmax layer's weights (query, key,
   value, output, gate) in that order plus its own (φ's, a recurrence's),
   so once the new ones are set aside the lists pair one to one; names and
   shapes are checked. The original model is only read.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
from keras.src.models.functional import Functional  # no public test for "functional"

from keras_linear_attention import feature_maps as fm_lib
from keras_linear_attention.blocks import LinearTransformerDecoder, LinearTransformerEncoder
from keras_linear_attention.layers import LinearMultiHeadAttention
from keras_linear_attention.layers._recurrence import RECURRENCES
from keras_linear_attention.linearize._common import (
    MHA,
    MHA_CALL,
    attention_layers,
    is_softmax_attention,
    new_weight_ids,
)

_BLOCKS = (LinearTransformerDecoder, LinearTransformerEncoder)
_KERAS_STORES = ("_layers", "_metrics", "_seed_generators", "_tracker")


def linearize(
    model: keras.Model,
    feature_map: Any = None,
    recurrence: str = "linear",
    *,
    skip_unconvertible: bool = False,
) -> keras.Model:
    """A new model with each softmax attention layer replaced by linear attention.

    Every `keras.layers.MultiHeadAttention` (in a functional or Sequential
    model, in nested models, or held as an attribute of a custom layer)
    becomes a `LinearMultiHeadAttention` with the same config and the same
    projection weights; `LinearTransformerDecoder`/`Encoder` blocks built
    with `attention="softmax"` become linear blocks (a decoder's causal
    self-attention becomes a `CausalLinearAttention`, so the model
    generates recurrently). keras-hub (optional, imported only for its
    layers): a `keras_hub.layers.TransformerDecoder`/`Encoder` becomes a
    `kla.hub.TransformerDecoder`/`Encoder`, a `keras_hub.models.GPT2Backbone`
    a `kla.hub.LinearGPT2Backbone`, and a `GPT2CausalLM` a
    `kla.hub.LinearGPT2CausalLM` (same preprocessor, compile config and
    sampler) whose `generate` carries a recurrent state; other keras-hub
    models with attention are refused. Calls keep their arguments: a causal
    softmax layer becomes a causal linear one. Every layer keeps its name and every
    other weight its value; the only new weights are φ's (and those of a
    gated or delta `recurrence`), so with a parameter-free φ such as
    `"elu"` `get_weights()` of the result equals the original's. `model` is
    left untouched. Then `attention_transfer` fits the new weights.

    Args:
        model: A functional or Sequential `keras.Model`.
        feature_map: φ of every new linear layer: a name (`"hedgehog"`,
            `"elu"`, ...), a config, a callable, or a feature-map layer used
            as a template (each attention layer gets a fresh copy from its
            config, without its weights). Default: Hedgehog as its paper
            trains it, `HedgehogFeatureMap(separate_query_key=True,
            use_bias=True)` (identity maps at first), whose weights
            `attention_transfer` fits; measured on a KJV char LM, separate
            maps with biases ended the transfer nearer softmax than the
            shared map without (1.02× against 1.04× the softmax bits/char).
            Must be None or `"elu"` (unused) for the recurrences other than
            `"linear"`.
        recurrence: `"linear"`, or for the self-attention of
            `LinearTransformerDecoder` blocks one of `"retention"`,
            `"gated"`, `"delta"`, `"gated_delta"` (see
            `CausalLinearAttention`); other attention layers become plain
            linear attention, and a bare causal `MultiHeadAttention` call
            or a keras-hub decoder is refused (it has no such state).
        skip_unconvertible: Keep layers that linear attention cannot
            reproduce as softmax (listed in a warning) instead of raising.

    Returns:
        The new `keras.Model` (compiled from the original's compile config
        if it was compiled: a fresh optimizer).

    Raises:
        ValueError: naming the layer and the reason, for a layer linear
            attention cannot reproduce: a call with an explicit
            `attention_mask` (only padding and causal masks are linear),
            `attention_axes` over a subset of the positional axes,
            `sliding_window`, a `MultiHeadAttention` subclass other than
            this package's (such as keras-hub's `CachedMultiHeadAttention`
            outside the keras-hub classes above), a keras-hub model other
            than GPT-2 holding attention; also for bad arguments.

    Custom layers are rebuilt with `from_config(get_config())`; one whose
    config builds a softmax layer again (no "attention" option) is
    converted in memory but reloads as softmax from a `.keras` file.

    Example:

    >>> import keras_linear_attention as kla
    >>> softmax = kla.build_causal_lm(
    ...     64, sequence_length=16, hidden_dim=16, num_heads=2, attention="softmax")
    >>> linear = kla.linearize(softmax, feature_map="elu")
    >>> type(linear.get_layer("decoder_0").self_attention).__name__
    'CausalLinearAttention'
    >>> all((a == b).all() for a, b in zip(softmax.get_weights(), linear.get_weights()))
    True
    """
    if not isinstance(model, (Functional, keras.Sequential)):
        raise TypeError(
            "`model` must be a functional or Sequential keras.Model (subclassed models "
            f"cannot be cloned layer by layer); received {type(model).__name__}."
        )
    if recurrence not in RECURRENCES:
        raise ValueError(f"`recurrence` must be one of {RECURRENCES}; received {recurrence!r}.")
    if not isinstance(skip_unconvertible, bool):
        raise TypeError(f"`skip_unconvertible` must be True or False; got {skip_unconvertible!r}.")
    ctx = _Context(_feature_map_factory(feature_map, recurrence), recurrence, skip_unconvertible)
    result = _convert_root(model, ctx)
    if not ctx.converted and not ctx.skipped:
        raise ValueError(
            f"Model {model.name!r} has no softmax attention layer to linearize (no "
            "keras.layers.MultiHeadAttention and no block with attention='softmax')."
        )
    _copy_weights(model, result, new_weight_ids(ctx.converted))
    if not model.trainable:
        result.trainable = False
    if ctx.skipped:
        listed = "; ".join(f"{path}: {reason}" for path, reason in ctx.skipped)
        warnings.warn(f"linearize kept these layers softmax: {listed}", stacklevel=2)
    return result


class _Context:
    """What one `linearize` call is converting, and where it is."""

    def __init__(self, feature_map: Callable[[], Any], recurrence: str, skip: bool):
        self.feature_map = feature_map
        self.recurrence = recurrence
        self.skip = skip
        self.reasons: dict[int, str] = {}  # id(layer) -> why its calls cannot be linear
        self.converted: list[keras.layers.Layer] = []
        self.skipped: list[tuple[str, str]] = []
        self.kept: set[int] = set()  # ids of the softmax copies of skipped layers
        self._path: list[str] = []

    @contextlib.contextmanager
    def at(self, name: str) -> Iterator[None]:
        self._path.append(name)
        try:
            yield
        finally:
            self._path.pop()

    @property
    def path(self) -> str:
        return "/".join(self._path)

    def unconvertible(self, layer: keras.layers.Layer, reason: str) -> keras.layers.Layer:
        """Raise, or with `skip_unconvertible` record and return a softmax copy."""
        if not self.skip:
            raise ValueError(
                f"linearize cannot convert layer {self.path!r} ({type(layer).__name__}): "
                f"{reason}. Pass skip_unconvertible=True to keep it softmax."
            )
        self.skipped.append((self.path, reason))
        copy = _clone(layer, self)
        self.kept.add(id(copy))
        return copy


def _feature_map_factory(feature_map: Any, recurrence: str) -> Callable[[], Any]:
    """A function returning a fresh φ per attention layer (one φ cannot serve two)."""
    if recurrence != "linear":
        if feature_map not in (None, "elu"):
            raise ValueError(
                f"`feature_map` applies to recurrence='linear' only; recurrence={recurrence!r} "
                f"L2-normalises q and k. Leave feature_map None; received {feature_map!r}."
            )
        return lambda: fm_lib.get("elu")
    if feature_map is None:  # Hedgehog as its paper trains it
        return lambda: fm_lib.HedgehogFeatureMap(separate_query_key=True, use_bias=True)
    spec = feature_map
    if isinstance(spec, keras.layers.Layer):
        make = lambda: type(spec).from_config(spec.get_config())
    else:
        make = lambda: fm_lib.get(spec)
    make()  # fail now, not deep inside the conversion
    return make


def _convert_root(model: keras.Model, ctx: _Context) -> keras.Model:
    if _from_keras_hub(model):
        with ctx.at(model.name):
            new = _convert_hub(model, ctx)
        if new is not None:
            return new
    return _convert_model(model, ctx)


def _convert_model(model: keras.Model, ctx: _Context) -> keras.Model:
    ctx.reasons.update(_call_reasons(model, ctx.recurrence))
    clone = lambda layer: _convert(layer, ctx)
    inputs = None
    if isinstance(model, Functional):  # clone_model names inputs after their tensors
        inputs = keras.tree.map_structure(_same_input, model.input)
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)


def _same_input(x: keras.KerasTensor) -> keras.KerasTensor:
    layer = x._keras_history.operation
    return keras.Input(batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse, name=layer.name)


def _convert(layer: keras.layers.Layer, ctx: _Context) -> keras.layers.Layer:
    """The new layer for `layer` (clone_model's `clone_function`)."""
    with ctx.at(layer.name):
        new = _convert_hub(layer, ctx) if _from_keras_hub(layer) else None
        if new is not None:
            return new
        if isinstance(layer, (Functional, keras.Sequential)):
            return _convert_model(layer, ctx)
        if is_softmax_attention(layer):
            return _convert_attention(layer, ctx)
        if _is_softmax_block(layer):
            return _convert_block(layer, ctx)
        if isinstance(layer, keras.layers.Layer) and _holds_softmax_attention(layer):
            return _convert_container(layer, ctx)
        return _clone(layer, ctx)


def _is_softmax_block(layer: Any) -> bool:
    return isinstance(layer, _BLOCKS) and layer.attention == "softmax"


def _holds_softmax_attention(layer: keras.layers.Layer) -> bool:
    return any(
        is_softmax_attention(sub) or _is_softmax_block(sub)
        for sub in layer._flatten_layers(include_self=False)
    )


def _convert_attention(layer: MHA, ctx: _Context) -> keras.layers.Layer:
    reason = _config_reason(layer) or ctx.reasons.get(id(layer))
    if reason:
        return ctx.unconvertible(layer, reason)
    config = {**layer.get_config(), "feature_map": ctx.feature_map()}
    config.pop("sliding_window", None)
    new = LinearMultiHeadAttention.from_config(config)
    ctx.converted.append(new)
    return new


def _config_reason(layer: MHA) -> str | None:
    """Why this layer's configuration has no linear counterpart, if it has none."""
    if type(layer) is not MHA:
        hub = (
            " (and keras-hub's TransformerDecoder, TransformerEncoder, GPT2Backbone and "
            "GPT2CausalLM, whole)"
            if _from_keras_hub(layer)
            else ""
        )
        return (
            f"it is a {type(layer).__name__}, a subclass of MultiHeadAttention whose call "
            f"may differ; only keras.layers.MultiHeadAttention itself is converted{hub}"
        )
    config = layer.get_config()
    if config.get("sliding_window") is not None:
        return (
            f"sliding_window={config['sliding_window']} is a softmax-only local window; "
            "linear attention sums over all (causally, all earlier) keys"
        )
    axes = config.get("attention_axes")
    if axes is None or not layer.built:
        return None  # an unbuilt layer's axes are checked by LinearMultiHeadAttention.build
    rank = len(layer.get_build_config()["shapes_dict"]["query_shape"]) + 1  # + heads axis
    if tuple(sorted(a % (rank - 1) for a in axes)) != tuple(range(1, rank - 2)):
        return (
            f"attention_axes={tuple(axes)} attends over a subset of the positional axes; "
            "linear attention attends over all of them (flattened)"
        )
    return None


def _call_reasons(model: keras.Model, recurrence: str) -> dict[int, str]:
    """Why some attention layers' recorded calls cannot be linear, by layer id."""
    reasons: dict[int, str] = {}
    if not isinstance(model, Functional):
        return reasons  # Sequential calls pass one tensor: no masks to see
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            layer = node.operation
            if is_softmax_attention(layer):
                signature = MHA_CALL
            elif _from_keras_hub(layer) and _hub_target(layer) is not None:
                signature = inspect.signature(type(layer).call)
            else:
                continue
            try:
                call = signature.bind(layer, *node.arguments.args, **node.arguments.kwargs)
            except TypeError:
                continue
            reason = _call_reason(call.arguments, recurrence)
            if reason:
                reasons[id(layer)] = reason
    return reasons


def _call_reason(call: dict, recurrence: str) -> str | None:
    for name in ("decoder_attention_mask", "encoder_attention_mask"):  # keras-hub's decoder
        if call.get(name) is not None:
            return (
                f"it is called with an explicit `{name}`; linear attention computes only "
                "padding and causal masks: pass `decoder_padding_mask` / "
                "`encoder_padding_mask` instead"
            )
    if call.get("attention_mask") is not None:
        return (
            "it is called with an explicit `attention_mask`; linear attention computes only "
            "padding masks (query_mask, value_mask, key_mask or Keras masks) and causal ones "
            "(use_causal_mask=True), and which kind a mask tensor is can only be checked on "
            "its values: pass those arguments instead"
        )
    if call.get("use_causal_mask") and recurrence != "linear":
        return (
            f"it is a causal MultiHeadAttention, and recurrence={recurrence!r} needs the "
            "state of a LinearTransformerDecoder's self-attention; use recurrence='linear'"
        )
    return None


def _convert_block(layer: keras.layers.Layer, ctx: _Context) -> keras.layers.Layer:
    config = layer.get_config()
    if isinstance(layer, LinearTransformerDecoder):
        config["attention"] = ctx.recurrence
    elif layer.causal and ctx.recurrence != "linear":
        return ctx.unconvertible(
            layer,
            f"recurrence={ctx.recurrence!r} applies to LinearTransformerDecoder blocks; a "
            "causal encoder block has no recurrent state, use recurrence='linear'",
        )
    else:
        config["attention"] = "linear"
    config["feature_map"] = ctx.feature_map()
    new = type(layer).from_config(config)
    ctx.converted.append(new)
    return new


def _from_keras_hub(layer: Any) -> bool:
    """Whether `layer`'s class is keras-hub's (tested without importing keras-hub)."""
    return type(layer).__module__.split(".")[0] == "keras_hub"


def _hub_target(layer: Any) -> type | None:
    """The `kla.hub` class for a keras-hub block or GPT-2 backbone of exactly
    the class keras-hub exports (subclasses may call differently)."""
    import keras_hub

    from keras_linear_attention import hub

    targets = {
        keras_hub.layers.TransformerDecoder: hub.TransformerDecoder,
        keras_hub.layers.TransformerEncoder: hub.TransformerEncoder,
        keras_hub.models.GPT2Backbone: hub.LinearGPT2Backbone,
    }
    return targets.get(type(layer))


def _convert_hub(layer: keras.layers.Layer, ctx: _Context) -> keras.layers.Layer | None:
    """The `kla.hub` counterpart of a keras-hub layer or model; None to
    convert it as any other layer (it holds no softmax attention, or it is
    a block such as a `TransformerDecoder` subclass whose attention
    attributes are then judged one by one)."""
    import keras_hub

    from keras_linear_attention import hub

    if type(layer) is keras_hub.models.GPT2CausalLM:
        return _convert_gpt2_causal_lm(layer, ctx)
    target = _hub_target(layer)
    if target is None:
        if isinstance(layer, Functional) and _holds_softmax_attention(layer):
            inside = [path for path, sub in attention_layers(layer) if is_softmax_attention(sub)]
            return ctx.unconvertible(
                layer,
                f"it is a keras-hub {type(layer).__name__} with softmax attention "
                f"({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}); of "
                "keras-hub's models linearize converts GPT2Backbone and GPT2CausalLM (and "
                "TransformerDecoder/Encoder blocks in functional models)",
            )
        return None
    reason = ctx.reasons.get(id(layer))
    if not reason and ctx.recurrence != "linear" and target is not hub.TransformerEncoder:
        reason = (
            f"recurrence={ctx.recurrence!r} applies to LinearTransformerDecoder blocks; "
            "keras-hub's decoders become kla.hub ones, use recurrence='linear'"
        )
    if reason:
        return ctx.unconvertible(layer, reason)
    try:
        new = target.from_config({**layer.get_config(), "feature_map": ctx.feature_map()})
        fm_lib.get(new.feature_map)  # what `build` will do: fail here, naming the layer
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"linearize could not build {target.__name__} for layer {ctx.path!r}: {error}. "
            "kla.hub blocks rebuild φ from its config: pass a name, a config or a "
            "registered feature-map layer, not a plain callable."
        ) from error
    ctx.converted.append(new)
    return new


def _convert_gpt2_causal_lm(model: keras.Model, ctx: _Context) -> keras.Model:
    """A `LinearGPT2CausalLM` over the converted backbone, with the same
    preprocessor (shared: keras-hub tokenizers keep their vocabulary outside
    their config), compile config and a copy of the sampler."""
    import keras_hub

    from keras_linear_attention import hub

    backbone = _convert(model.backbone, ctx)
    cls = hub.LinearGPT2CausalLM if isinstance(backbone, hub.LinearGPT2Backbone) else type(model)
    new = cls(backbone, preprocessor=model.preprocessor, name=model.name, compile=False)
    if model.compiled:
        config = keras.saving.deserialize_keras_object(model.get_compile_config())
        sampler = keras_hub.samplers.get(keras_hub.samplers.serialize(model.sampler))
        new.compile(**config, sampler=sampler)
    return new


def _convert_container(layer: keras.layers.Layer, ctx: _Context) -> keras.layers.Layer:
    """Rebuild a custom layer from its config, then swap its attention attributes."""
    new = _clone(layer, ctx)
    if layer.built and not new.built and type(new).build is not keras.layers.Layer.build:
        new.build_from_config(layer.get_build_config())  # sublayers made in `build`
    done: dict[int, keras.layers.Layer] = {}  # id(new's old child) -> replacement
    for name, value in list(vars(layer).items()):
        if name in _KERAS_STORES:
            continue
        if isinstance(value, keras.layers.Layer):
            slot = lambda child, name=name: setattr(new, name, child)
            _swap_child(new, value, getattr(new, name, None), slot, done, ctx)
        elif isinstance(value, list):
            mirror = getattr(new, name, None)
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer) and isinstance(mirror, list):
                    slot = lambda child, mirror=mirror, i=i: mirror.__setitem__(i, child)
                    counterpart = mirror[i] if i < len(mirror) else None
                    _swap_child(new, item, counterpart, slot, done, ctx)
    return new


def _swap_child(parent, original, counterpart, assign, done, ctx) -> None:
    """Put the converted `original` where `parent` (a rebuilt copy) holds `counterpart`."""
    if not (is_softmax_attention(original) or _is_softmax_block(original)):
        if not _holds_softmax_attention(original):
            return
    if counterpart is None or type(counterpart) is not type(original):
        raise ValueError(
            f"linearize cannot convert layer {ctx.path!r}: rebuilt from its config, it does "
            f"not hold a {type(original).__name__} where the original holds "
            f"{original.name!r}. Its get_config() must return every constructor argument."
        )
    if id(counterpart) not in done:
        replacement = _convert(original, ctx)
        # Kept softmax: the rebuilt parent's own copy is that already, and built.
        done[id(counterpart)] = counterpart if id(replacement) in ctx.kept else replacement
    replacement = done[id(counterpart)]
    if counterpart is replacement:
        return
    tracker = parent._tracker
    locked, tracker.locked = tracker.locked, False  # built layers refuse new sublayers
    try:
        index = next((i for i, x in enumerate(parent._layers) if x is counterpart), None)
        assign(replacement)
        if index is not None:  # same slot in the tracking order: weights keep their order
            tracker.untrack(counterpart)
            parent._layers[:] = [x for x in parent._layers if x is not replacement]
            parent._layers.insert(index, replacement)
            tracker.stored_ids["layers"].add(id(replacement))
    finally:
        tracker.locked = locked


def _clone(layer: keras.layers.Layer, ctx: _Context) -> keras.layers.Layer:
    try:
        return type(layer).from_config(layer.get_config())
    except Exception as error:
        raise ValueError(
            f"linearize could not rebuild layer {ctx.path!r} ({type(layer).__name__}) from "
            f"its config: {error}. Its get_config() must return every constructor argument."
        ) from error


def _copy_weights(source: keras.Model, target: keras.Model, new_ids: set[int]) -> None:
    sources = source.weights
    targets = [w for w in target.weights if id(w) not in new_ids]
    if len(sources) != len(targets):
        raise RuntimeError(
            f"linearize rebuilt {len(targets)} weights for the {len(sources)} of model "
            f"{source.name!r}: a custom layer's get_config() or build does not rebuild it "
            "exactly."
        )
    for src, dst in zip(sources, targets, strict=True):
        if src.name != dst.name or tuple(src.shape) != tuple(dst.shape):
            raise RuntimeError(
                f"linearize paired weight {src.path} {tuple(src.shape)} with {dst.path} "
                f"{tuple(dst.shape)}: a custom layer does not rebuild in the same order."
            )
        dst.assign(src)
