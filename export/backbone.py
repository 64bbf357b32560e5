"""Load a Keras classifier and split it at the target layer.

The explainer needs two pieces: `features` (preprocessed image -> target-layer activations A) and
`head` (A -> pre-softmax logits). Gradients are then taken through `head` only, never through the
backbone. Nested models (a `keras.applications` base inside a transfer-learning model) are first
replayed into one flat graph, so that any inner layer can be the split point ("Graph disconnected"
cannot happen).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Sequence

import keras
import tensorflow as tf

from . import efficientnet_lite
from .options import PRECISIONS
from .tokens import TokenGrid, token_grid

POOLING_LAYERS = (
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
)
SOFTMAX_ACTIVATIONS = {"softmax", "sigmoid"}
NAMED_WEIGHTS = ("imagenet", "auto", "none")


@dataclasses.dataclass
class Backbone:
    """A classifier split at `target_layer`, with everything the explainer graph needs."""

    name: str
    features: keras.Model  # preprocessed image -> A [N, h, w, K], or tokens [N, T, K] laid out by token_grid
    head: keras.Model  # A (or the tokens) -> logits [N, C]
    target_layer: str
    image_size: tuple[int, int]
    preprocess: Callable[[tf.Tensor], tf.Tensor]
    cam_kernel: tf.Variable | None  # [K, C] when the head is global average pooling + dense
    notes: list[str]
    # --target-layers: the layers whose maps are fused, shallow to deep, and the network cut at
    # each of them: input -> A_1, A_1 -> A_2, ..., A_L -> logits (empty without --target-layers).
    fusion_layers: tuple[str, ...] = ()
    fusion_segments: tuple[keras.Model, ...] = ()
    token_grid: TokenGrid | None = None  # how a token target layer's tokens lie on the image

    @property
    def num_classes(self) -> int:
        return int(self.head.output.shape[-1])


# Backbones built here rather than by keras.applications, by normalised name: each module has
# `build_with(weights, image_size)`, `preprocess_input` and `packaged_weights()` (its ImageNet weights
# from an installed package, so that they need no internet).
OWN_BACKBONES = {"efficientnetlite0": efficientnet_lite}


def application_constructors() -> dict[str, Callable[..., keras.Model]]:
    """`keras.applications` model constructors by lower-case name without underscores."""
    return {
        name.lower(): getattr(keras.applications, name)
        for name in dir(keras.applications)
        if name[0].isupper() and callable(getattr(keras.applications, name))
    }


def _normalise_name(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _preprocess_of(constructor: Callable) -> Callable[[tf.Tensor], tf.Tensor]:
    """The `preprocess_input` of the module that defines a `keras.applications` constructor."""
    return sys.modules[constructor.__module__].preprocess_input


def _identity(x: tf.Tensor) -> tf.Tensor:
    return x


def preprocess_by_name(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """`none` (pixels 0..255 as they are) or the preprocessing of a keras.applications model."""
    if name == "none":
        return _identity
    constructors = application_constructors()
    key = _normalise_name(name)
    if key in OWN_BACKBONES:
        return OWN_BACKBONES[key].preprocess_input
    if key not in constructors:
        raise ValueError(f"unknown preprocessing {name!r}: use 'none' or a keras.applications name")
    return _preprocess_of(constructors[key])


def _build_application(constructor: Callable, weights: str, image_size: int | None) -> keras.Model:
    """The application with a linear classifier; `auto` falls back to random weights offline."""
    kwargs = {"weights": "imagenet" if weights in ("imagenet", "auto") else None, "classifier_activation": None}
    if image_size:
        kwargs["input_shape"] = (image_size, image_size, 3)
    try:
        return constructor(**kwargs)
    except Exception as error:  # Keras raises a bare Exception when the download fails
        if "URL fetch failure" not in str(error):
            raise
        if weights != "auto":
            raise ValueError(
                "--weights imagenet: the ImageNet weights are not in Keras' cache (~/.keras/models) and cannot be "
                "downloaded (no internet?): pass --weights FILE, or auto to fall back to random weights"
            ) from None
        print(
            "ImageNet weights could not be had (not cached, no internet; pass --weights FILE): "
            "using random weights, so the labels are meaningless"
        )
        return constructor(**{**kwargs, "weights": None})


def _build_own(module, weights: str, image_size: int | None) -> keras.Model:
    """A backbone of OWN_BACKBONES; imagenet and auto take the packaged weights (auto: random without them)."""
    path = None if weights == "none" else weights
    if weights in ("imagenet", "auto"):
        try:
            path = module.packaged_weights()
        except FileNotFoundError as error:
            if weights == "imagenet":
                raise
            print(f"{error}: using random weights, so the labels are meaningless")
            path = None
    return module.build_with(path, image_size)


def load_model(
    backbone: str, weights: str, image_size: int | None
) -> tuple[keras.Model, Callable[[tf.Tensor], tf.Tensor] | None]:
    """Build or load the classifier; returns it with the backbone's own preprocessing if known."""
    if weights not in NAMED_WEIGHTS and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights!r}: no such file (or use imagenet, auto or none)")
    if backbone.endswith(".keras") or os.path.isfile(backbone):
        model = keras.models.load_model(backbone, compile=False)
        preprocess = None
    else:
        key = _normalise_name(backbone)
        if key in OWN_BACKBONES:
            module = OWN_BACKBONES[key]
            return _build_own(module, weights, image_size), module.preprocess_input
        constructors = application_constructors()
        if key not in constructors:
            raise ValueError(
                f"unknown backbone {backbone!r}: give a .keras file or one of "
                + ", ".join(sorted([*constructors, *(module.NAME for module in OWN_BACKBONES.values())]))
            )
        constructor = constructors[key]
        model = _build_application(constructor, weights, image_size)
        preprocess = _preprocess_of(constructor)
    if weights not in NAMED_WEIGHTS:
        model.load_weights(weights)
    return model, preprocess


def _is_model(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.Model)


def flatten(model: keras.Model) -> tuple[keras.Model, dict[str, keras.KerasTensor]]:
    """Replay `model` layer by layer (entering nested models) on a fresh input.

    Returns the flat model and the output tensor of every layer by name, so that a layer deep
    inside a nested base can be the split point.
    """
    produced: dict[str, keras.KerasTensor] = {}

    def run(m: keras.Model, x):
        if isinstance(m, keras.Sequential):
            for layer in m.layers:
                x = run(layer, x) if _is_model(layer) else record(layer)(x)
            return x
        return m._run_through_graph(
            x, operation_fn=lambda op: (lambda *a, **k: run(op, a[0])) if _is_model(op) else record(op)
        )

    def record(layer):
        def call(*args, **kwargs):
            out = layer(*args, **kwargs)
            produced[layer.name] = out
            return out

        return call

    inputs = keras.Input(shape=model.input_shape[1:], dtype=model.inputs[0].dtype, name="pixels")
    outputs = run(model, inputs)
    return keras.Model(inputs, outputs, name=model.name), produced


def find_target_layer(model: keras.Model) -> str:
    """The last operation with a 4-D output (not a pooling layer), searching nested models too.

    Operations, not only layers: a residual `x + y` at the end of a block (ConvNeXt) is an
    operation in Keras 3, and the layer before it would leave the residual path outside the head.
    """
    for op in reversed(getattr(model, "operations", model.layers)):
        if _is_model(op):
            try:
                return find_target_layer(op)
            except ValueError:
                continue
        if isinstance(op, POOLING_LAYERS) or isinstance(op, keras.layers.InputLayer):
            continue
        if len(op.output.shape) == 4:
            return op.name
    raise ValueError(f"model {model.name!r} has no layer with a 4-D output to explain")


def _patch_gradient(head: keras.Model, grid: TokenGrid) -> tuple[tf.Tensor, tf.Tensor]:
    """Random tokens laid out as the grid, and the gradient of the logits' sum with respect to them."""
    tokens = tf.random.normal([1, *head.input.shape[1:]], seed=0)
    with tf.GradientTape() as tape:
        tape.watch(tokens)
        logits = head(tokens, training=False)
    gradient = tape.gradient(logits, tokens, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return grid.grid(tokens), grid.grid(gradient)


def _reaches(gradient: tf.Tensor) -> bool:
    """Whether the patch tokens reach the score (not when a head on the class token reads a per-token
    layer such as the final norm: their gradient is exactly zero)."""
    return bool(tf.reduce_any(gradient != 0))


def _orthogonal(tokens: tf.Tensor, gradient: tf.Tensor) -> bool:
    """Whether each patch token's gradient is orthogonal to the token, as when the tokens reach the score
    only through a layer normalisation (invariant to scaling its input): Σ_k ∂y/∂A_k A_k = 0."""
    cosine = tf.reduce_sum(tokens * gradient, -1) / (tf.norm(tokens, axis=-1) * tf.norm(gradient, axis=-1) + 1e-30)
    return bool(tf.reduce_max(tf.abs(cosine)) < 1e-4)


def find_token_layer(flat: keras.Model, produced: dict, image_size: tuple[int, int], after: str | None,
                     grid: str | None, prefix: int | None) -> tuple[str, TokenGrid] | None:
    """The last token layer [N, T, C] after the layer `after` whose patch tokens reach the score, and
    its layout: the final norm before a head that pools the tokens; the last block's input (the output
    of the block before it) when the head reads the class token alone. None when there is none."""
    operations = [op.name for op in flat.operations]
    start = 0 if after is None else operations.index(after) + 1 if after in operations else len(operations)
    for name in reversed(operations[start:]):
        if name not in produced or len(produced[name].shape) != 3:
            continue
        try:
            layout = token_grid(int(produced[name].shape[1]), image_size, grid, prefix)
            head = keras.Model(produced[name], flat.output)
        except ValueError:  # not a grid of the image's patches, or a residual goes around it
            continue
        if _reaches(_patch_gradient(head, layout)[1]):
            return name, layout
    return None


def _activation_name(layer: keras.layers.Layer) -> str | None:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) if activation is not None else None


def strip_output_activation(model: keras.Model) -> tuple[keras.Model, str | None]:
    """Make the model output pre-activation logits (the Grad-CAM score); says what it did."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return keras.Model(model.input, last.input), f"removed the final {last.name!r} Softmax layer"
    name = _activation_name(last)
    if name in SOFTMAX_ACTIVATIONS:
        last.activation = keras.activations.linear
        return model, f"scores are the logits before the {name} of layer {last.name!r}"
    return model, None


def _gap_dense_kernel(head: keras.Model, grid: TokenGrid | None) -> tf.Variable | None:
    """The dense kernel when the head is global average pooling, (dropout,) dense: CAM's w. Over a
    token layer, only when it has no prefix tokens (the pooling would count them too)."""
    pooling = keras.layers.GlobalAveragePooling1D if grid else keras.layers.GlobalAveragePooling2D
    if grid and grid.prefix:
        return None
    layers = [layer for layer in head.layers if not isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout))]
    if (
        len(layers) == 2
        and isinstance(layers[0], pooling)
        and isinstance(layers[1], keras.layers.Dense)
        and _activation_name(layers[1]) in (None, "linear")
    ):
        return layers[1].kernel
    return None


def _cut(inputs, outputs, name: str, after: str) -> keras.Model:
    """The part of the flat graph from `inputs` to `outputs`; refuses a cut that a skip connection crosses."""
    try:
        return keras.Model(inputs, outputs, name=name)
    except ValueError as error:
        raise ValueError(
            f"the output does not depend on {after!r} alone (a skip connection goes around it): "
            "choose a later layer (a block's output)"
        ) from error


def fusion_chain(
    flat: keras.Model, produced: dict, layers: list[str]
) -> tuple[tuple[str, ...], tuple[keras.Model, ...]]:
    """The --target-layers, shallow to deep, and the segments between them (input, A_1, ..., logits)."""
    depth = {op.name: i for i, op in enumerate(flat.operations)}
    for name in layers:
        if name not in produced:
            raise ValueError(f"--target-layers: no layer {name!r} in {flat.name!r}")
        if len(produced[name].shape) != 4:
            raise ValueError(
                f"--target-layers: {name!r} has output shape {produced[name].shape}; it needs [N, h, w, channels]"
            )
    ordered = sorted(dict.fromkeys(layers), key=depth.__getitem__)
    if len(ordered) < 2:
        raise ValueError("--target-layers needs at least two layers to fuse (one layer: --target-layer)")
    ends = [flat.input, *(produced[name] for name in ordered), flat.output]
    segments = tuple(
        _cut(start, end, f"segment_{i}", ordered[i - 1] if i else "the input")
        for i, (start, end) in enumerate(zip(ends, ends[1:]))
    )
    return tuple(ordered), segments


def set_precision(model: keras.Model, precision: str) -> None:
    """Make every layer compute in `precision` (Keras mixed precision: variables stay float32 and are
    cast where they are read). The policy is read when a layer is called, so this holds for every
    graph traced afterwards, and `set_precision(model, "float32")` undoes it."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    for layer in model.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            layer.dtype_policy = PRECISIONS[precision]


def load_backbone(
    backbone: str,
    weights: str = "imagenet",
    target_layer: str | None = None,
    image_size: int | None = None,
    preprocess: str = "auto",
    target_layers: Sequence[str] = (),
    precision: str = "float32",
    token_grid_size: str | None = None,
    prefix_tokens: int | None = None,
) -> Backbone:
    """Load `backbone`, strip its output activation, make it compute in `precision` and split it at
    the target layer (and at each of `target_layers`, for fused maps). A token target layer [N, T, C]
    is laid out by `token_grid_size` (HxW) and `prefix_tokens`, or as tokens.token_grid finds."""
    model, own_preprocess = load_model(backbone, weights, image_size)
    notes = []
    model, stripped = strip_output_activation(model)
    if stripped:
        notes.append(stripped)
    flat, produced = flatten(model)
    height, width = flat.input_shape[1:3]
    if height is None or width is None:
        raise ValueError("the model has no fixed input size: give --image-size")
    size = (int(height), int(width))
    layout = None
    if target_layer:
        target = target_layer
        if target not in produced:
            raise ValueError(f"--target-layer {target!r}: no such layer in {model.name!r}")
        if len(produced[target].shape) == 3:
            layout = token_grid(int(produced[target].shape[1]), size, token_grid_size, prefix_tokens)
    else:
        try:
            target = find_target_layer(model)
        except ValueError:
            target = None
        found = find_token_layer(flat, produced, size, target, token_grid_size, prefix_tokens)
        if found:
            target, layout = found
        elif target is None:
            raise ValueError(f"model {model.name!r} has no layer with a 4-D output or a grid of tokens to explain")
    activations = produced[target]
    if len(activations.shape) != (3 if layout else 4):
        raise ValueError(f"target layer {target!r} has output shape {activations.shape}; it needs [N, h, w, channels] "
                         "or tokens [N, T, channels]")
    set_precision(flat, precision)
    features = keras.Model(flat.input, activations, name="features")
    head = _cut(activations, flat.output, "head", target)
    tokens, gradient = _patch_gradient(head, layout) if layout else (None, None)
    if layout and not _reaches(gradient):
        raise ValueError(f"the score does not depend on the patch tokens of {target!r} (the head reads the class "
                         "token alone): choose an earlier layer, e.g. the last block's input")
    if layout and _orthogonal(tokens, gradient):
        notes.append(f"the patch tokens of {target!r} reach the score only through layer normalisation, which "
                     "makes Σ_k ∂y/∂A_k A_k zero at every token: HiResCAM's map is rounding noise there and "
                     "Grad-CAM's channel weights are weak; LayerCAM localises (docs/DEPLOYING.md: Transformers)")
    fusion_layers, fusion_segments = fusion_chain(flat, produced, list(target_layers)) if target_layers else ((), ())
    if preprocess == "auto":
        preprocess_fn = own_preprocess or _identity
        if own_preprocess is None:
            notes.append("no preprocessing: the model gets pixels 0..255 (use --preprocess to change)")
    else:
        preprocess_fn = preprocess_by_name(preprocess)
    return Backbone(
        name=model.name,
        features=features,
        head=head,
        target_layer=target,
        image_size=size,
        preprocess=preprocess_fn,
        cam_kernel=_gap_dense_kernel(head, layout),
        notes=notes,
        fusion_layers=fusion_layers,
        fusion_segments=fusion_segments,
        token_grid=layout,
    )
