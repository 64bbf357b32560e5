"""Guided backpropagation (Springenberg et al. 2015, arXiv 1412.6806, section 3.4), for Guided Grad-CAM.

The gradient of the class score with respect to the input pixels, through a network whose every
ReLU passes a gradient back only where both its input and the incoming gradient are positive. The
forward values are those of the plain network, so the model is not cloned (no second copy of the
weights in the SavedModel): its ReLUs are swapped for guided ones while the guided pass is traced,
and put back after. Only the graph traced inside `guided_relus` differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import keras
import tensorflow as tf

RELU_MAX = {"relu": None, "relu6": 6.0}  # activation functions by name -> their upper clip
PASSIVE = {None, "linear", "softmax", "sigmoid"}  # no gating to speak of, or only at the output


def guided_relu(max_value: float | None = None):
    """ReLU (clipped at max_value if given) whose gradient is dy where x is in the active range and
    dy > 0, else 0."""

    @tf.custom_gradient
    def relu(x):
        y = tf.nn.relu(x) if max_value is None else tf.clip_by_value(x, 0.0, max_value)
        active = x > 0 if max_value is None else tf.logical_and(x > 0, x < max_value)

        def backward(dy):
            return tf.where(tf.logical_and(active, dy > 0), dy, tf.zeros_like(dy))

        return y, backward

    return relu


@dataclasses.dataclass
class Swaps:
    """What `guided_relus` changed: the layers it guides and the activations it leaves alone."""

    guided: list[str] = dataclasses.field(default_factory=list)
    unguided: set[str] = dataclasses.field(default_factory=set)  # other activations: plain gradients
    replacements: list = dataclasses.field(default_factory=list)  # (layer, attribute, guided function)


def _plan(layers: list[keras.layers.Layer]) -> Swaps:
    swaps = Swaps()
    for layer in layers:
        if isinstance(layer, keras.layers.ReLU):
            if layer.negative_slope == 0 and layer.threshold == 0:
                swaps.guided.append(layer.name)
                swaps.replacements.append((layer, "call", guided_relu(layer.max_value)))
            else:
                swaps.unguided.add(f"{layer.name} (leaky or thresholded ReLU)")
            continue
        activation = getattr(layer, "activation", None)
        name = getattr(activation, "__name__", None)
        if name in RELU_MAX:
            swaps.guided.append(layer.name)
            swaps.replacements.append((layer, "activation", guided_relu(RELU_MAX[name])))
        elif name not in PASSIVE:
            swaps.unguided.add(name)
    return swaps


def survey(*models: keras.Model) -> Swaps:
    """What `guided_relus(*models)` would guide, without changing anything."""
    return _plan([layer for model in models for layer in model.layers])


@contextlib.contextmanager
def guided_relus(*models: keras.Model) -> Iterator[Swaps]:
    """Within the block, calling `models` traces guided ReLUs (a layer's `activation` or a ReLU
    layer's `call`); they are restored on exit."""
    swaps = survey(*models)
    saved = [(layer, attribute, layer.__dict__.get(attribute)) for layer, attribute, _ in swaps.replacements]
    try:
        for layer, attribute, replacement in swaps.replacements:
            object.__setattr__(layer, attribute, replacement)
        yield swaps
    finally:
        for layer, attribute, original in saved:
            if original is None:
                object.__delattr__(layer, attribute)  # `call` was the class's method
            else:
                object.__setattr__(layer, attribute, original)
