"""Eager references for the tests: what the exported graph must equal, computed with Keras and a tape, and
how closely a float32 graph can equal them (`reference`)."""

from __future__ import annotations

import pathlib
from typing import Callable

import cv2
import numpy as np

# `reference`'s tolerance: FACTOR times the largest deviation float32-sized errors of the evidence cause
# (the served map's own deviation is one more draw of them, from other kernels), plus FLOOR of the map's
# scale for the float32 arithmetic after the evidence, which the eager runs do in float64 (channel sum, ReLU,
# normalisation, resize): about 300 roundings of 2^-24 (6e-8), more than those few ops add up to in practice.
FACTOR = 4
FLOOR = 2e-5
SAMPLES = 8  # evidence perturbed at random, beside the float32 evidence itself
MAX_TOLERANCE = 0.05  # of the map's scale: a map float32 moves further is refused, not tested

_MODELS: dict = {}  # (.keras file, dtype) -> model: loading and retyping cost a second a model


def logits_model(source, dtype: str = "float32"):
    """A classifier (a .keras file, or a Keras model, left unchanged) as eager Keras with logits as its output
    (its `predictions` layer made linear). dtype "float64": every layer, the input included, computes in
    float64 with the same weights (float32 values are exact in float64), so its answers are the float32
    model's without most of float32's rounding."""
    import keras

    model = keras.models.load_model(source) if isinstance(source, (str, pathlib.Path)) else source
    if dtype != "float32" or model is source:
        def retyped(layer):
            return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

        weights = model.get_weights()
        model = keras.models.clone_model(model, input_tensors=keras.Input(model.input.shape[1:], dtype=dtype),
                                         clone_function=retyped)
        model.set_weights(weights)
    model.get_layer("predictions").activation = keras.activations.linear
    return model


def evidence(model, layer, images: np.ndarray, class_index: np.ndarray, preprocess: Callable | None = None):
    """(targets, A, dy_c/dA) at `layer` for each image, computed in the dtype of the model's input and returned
    as float64: class_index -1 is the top-1 class. `layer` may be a tuple of names: A and dy_c/dA are then
    lists. `preprocess` runs on the pixels (exact in either dtype) before the model."""
    import keras
    import tensorflow as tf

    names = [layer] if isinstance(layer, str) else list(layer)
    grad_model = keras.Model(model.input, [model.get_layer(name).output for name in names] + [model.output])
    x = images.astype(model.input.dtype)
    with tf.GradientTape() as tape:
        *a, logits = grad_model(preprocess(x) if preprocess else x, training=False)
        targets = np.where(class_index < 0, np.argmax(logits, axis=1), class_index)
        score = tf.reduce_sum(tf.gather(logits, targets, batch_dims=1))
    g = tape.gradient(score, a)
    a, g = [v.numpy().astype(np.float64) for v in a], [v.numpy().astype(np.float64) for v in g]
    return (targets, a[0], g[0]) if isinstance(layer, str) else (targets, a, g)


def normalised(raw: np.ndarray) -> np.ndarray:
    """ReLU, then divided by the maximum (an all-zero map stays zero)."""
    heat = np.maximum(raw, 0)
    return heat / heat.max() if heat.max() > 0 else heat


def resized(heat: np.ndarray, size: int) -> np.ndarray:
    """Bilinear with half-pixel centres (cv2.resize), as the graph's resize."""
    return cv2.resize(heat.astype(np.float32), (size, size))


class Run:
    """One run of a reference formula: `model` in `dtype` and `evidence` as `evidence()` computes it with that
    model, or, given `noise` (a numpy Generator), the float64 evidence with random errors of the size of the
    float32 evidence's (per image and layer) where it is not zero (a zero there is exact: a ReLU's, a
    gradient that a ReLU or max pooling stopped)."""

    def __init__(self, models: dict, dtype: str, cache: dict, noise: np.random.Generator | None = None):
        self.models, self.dtype, self.cache, self.noise = models, dtype, cache, noise
        self.model = models[dtype]
        self.drawn: dict = {}  # one draw of errors per evidence, however often the formula asks for it

    def evidence(self, layer, images: np.ndarray, class_index, preprocess: Callable | None = None):
        """`evidence()` of this run's model (targets, A, dy_c/dA), or the float64 one perturbed."""
        key = (str(layer), images.tobytes(), images.shape, np.asarray(class_index).tobytes(), preprocess)
        for dtype in ("float64", "float32"):
            if (dtype, *key) not in self.cache:
                self.cache[dtype, *key] = evidence(self.models[dtype], layer, images, np.asarray(class_index),
                                                   preprocess)
        targets, a, g = self.cache["float64", *key]
        rounded_targets, rounded_a, rounded_g = self.cache["float32", *key]
        assert (targets == rounded_targets).all(), "float32 and float64 explain different classes: no reference"
        if self.noise is None:
            return self.cache[self.dtype, *key]
        if key not in self.drawn:
            if isinstance(layer, str):
                self.drawn[key] = targets, self._perturbed(a, rounded_a), self._perturbed(g, rounded_g)
            else:
                self.drawn[key] = (targets, [self._perturbed(e, r) for e, r in zip(a, rounded_a)],
                                   [self._perturbed(e, r) for e, r in zip(g, rounded_g)])
        return self.drawn[key]

    def _perturbed(self, exact: np.ndarray, rounded: np.ndarray) -> np.ndarray:
        """`exact` plus Gaussian errors where it is not zero, of the RMS of (rounded - exact) where both are
        not zero: a gradient that max pooling sends to another position in float32 (zero in one, not in the
        other) is a jump the float32 run has, not a rounding error to spread over every element."""
        both = (exact != 0) & (rounded != 0)
        axes = tuple(range(1, exact.ndim))
        squares = np.where(both, (rounded - exact) ** 2, 0).sum(axis=axes, keepdims=True)
        rms = np.sqrt(squares / np.maximum(both.sum(axis=axes, keepdims=True), 1))
        return exact + (exact != 0) * rms * self.noise.standard_normal(exact.shape)


def _models(source) -> dict:
    """The float32 and float64 logits models of `source`, made once per run for a file."""
    if not isinstance(source, (str, pathlib.Path)):
        return {dtype: logits_model(source, dtype) for dtype in ("float32", "float64")}
    for dtype in ("float32", "float64"):
        if (str(source), dtype) not in _MODELS:
            _MODELS[str(source), dtype] = logits_model(source, dtype)
    return {dtype: _MODELS[str(source), dtype] for dtype in ("float32", "float64")}


def reference(formula: Callable[[Run], np.ndarray], source, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(map, tolerance per cell) of a served float32 map against `formula` (a Run -> the maps it computes from
    the run's evidence and model) of the classifier `source`.

    A float32 graph equals a formula only as well as float32 rounding of the formula's inputs allows, and how
    far that rounding moves a map depends on the formula: Grad-CAM++ divides by 2g² + ΣA·g³, which nearly
    vanishes in some cells of the ViT. So the map is the formula of the float64 evidence, and the tolerance
    is FACTOR times its largest distance to the formula of the float32 evidence and of SAMPLES float64
    evidences with float32-sized random errors (one float32 draw alone may land near the truth by chance
    where the served graph's does not), plus FLOOR for the float32 arithmetic after the evidence.
    """
    models = _models(source)
    cache: dict = {}
    exact = np.asarray(formula(Run(models, "float64", cache)), np.float64)
    noise = np.random.default_rng(seed)
    runs = [Run(models, "float32", cache)] + [Run(models, "float64", cache, noise) for _ in range(SAMPLES)]
    spread = np.max([np.abs(np.asarray(formula(run), np.float64) - exact) for run in runs], axis=0)
    scale = np.abs(exact).max() or 1.0  # 1 for normalised maps
    tolerance = FACTOR * spread + FLOOR * scale
    assert tolerance.max() <= MAX_TOLERANCE * scale, \
        f"float32 moves this map by up to {spread.max():.2g}: too ill-conditioned to test against its formula"
    return exact, tolerance


def assert_within(served: np.ndarray, expected: np.ndarray, tolerance: np.ndarray, what: str = "") -> None:
    """|served - expected| <= tolerance in every cell, with `reference`'s (expected, tolerance)."""
    served = np.asarray(served, np.float64)
    assert served.shape == expected.shape, (what, served.shape, expected.shape)
    difference = np.abs(served - expected)
    beyond = difference > tolerance
    if beyond.any():
        worst = np.unravel_index(np.argmax(difference - tolerance), difference.shape)
        raise AssertionError(f"{what}: {beyond.sum()} of {beyond.size} cells beyond their tolerance; at {worst}: "
                             f"|served - reference| {difference[worst]:.3e} > {tolerance[worst]:.3e}")
