"""Eager references for the tests: what the exported graph must equal, computed with Keras and a tape."""

from __future__ import annotations

import cv2
import numpy as np


def logits_model(path):
    """A saved classifier, eager Keras, with logits as its output (its `predictions` layer made linear)."""
    import keras

    model = keras.models.load_model(path)
    model.get_layer("predictions").activation = keras.activations.linear
    return model


def evidence(model, layer: str, images: np.ndarray, class_index: np.ndarray):
    """(targets, A, dy_c/dA) at `layer` for each image, float64: class_index -1 is the top-1 class."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.input, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        a, logits = grad_model(images.astype(np.float32), training=False)
        targets = np.where(class_index < 0, np.argmax(logits, axis=1), class_index)
        score = tf.reduce_sum(tf.gather(logits, targets, batch_dims=1))
    g = tape.gradient(score, a)
    return targets, a.numpy().astype(np.float64), g.numpy().astype(np.float64)


def normalised(raw: np.ndarray) -> np.ndarray:
    """ReLU, then divided by the maximum (an all-zero map stays zero)."""
    heat = np.maximum(raw, 0)
    return heat / heat.max() if heat.max() > 0 else heat


def resized(heat: np.ndarray, size: int) -> np.ndarray:
    """Bilinear with half-pixel centres (cv2.resize), as the graph's resize."""
    return cv2.resize(heat.astype(np.float32), (size, size))
