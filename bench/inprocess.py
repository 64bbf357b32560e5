"""In-process baselines: the SavedModel signatures called directly, and Grad-CAM computed eagerly.

"Directly" means the way TF Serving runs them (serving/servables/session.py: LoadSavedModel, one
Session::Run per call), so that the gRPC figures compare with the same computation in-process.

Configurations are timed round-robin (one call of each in turn), so that the noise of a shared
machine falls on all of them alike and their ratios stay meaningful.
"""

from __future__ import annotations

import time
from typing import Callable

import cv2
import numpy as np


def round_robin(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each configuration, interleaved."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def signature_calls(session, signatures: list[str], batch: int, images: np.ndarray | None, jpegs: list[bytes]):
    """Zero-argument callables running each signature of a SavedModelSession on one batch, by name:
    `<signature>`, or `<signature>:<method>` for one with a method input (explain, explain_bytes)."""
    calls = {}
    for name in signatures:
        signature, _, method = name.partition(":")
        arrays = {
            "images": None if images is None else images[:batch],
            "image_bytes": np.array((jpegs * batch)[:batch], dtype=object),
            "class_index": np.full(batch, -1, np.int32),
            "method": np.array([method] * batch, dtype=object),
        }
        inputs = {key: arrays[key] for key in session.signature_defs[signature].inputs}
        calls[name] = lambda s=signature, i=inputs: session.run_signature(s, i)
    return calls


def eager_gradcam(backbone: str, target_layer: str, weights: str):
    """The eager Grad-CAM baseline: a tape over the whole Keras model, a numpy loop over the channels, cv2."""
    import keras
    import tensorflow as tf

    from camserve.export.backbone import find_target_layer, load_model

    model, preprocess = load_model(backbone, weights, None)
    target_layer = target_layer or find_target_layer(model)
    grad_model = keras.Model(model.input, [model.get_layer(target_layer).output, model.output])

    def explain(images: np.ndarray) -> np.ndarray:
        x = preprocess(images.astype(np.float32))
        with tf.GradientTape() as tape:
            conv_output, preds = grad_model(x)
            top = tf.argmax(preds, axis=1)
            class_channel = tf.gather(preds, top, batch_dims=1)
        grads = tape.gradient(class_channel, conv_output)
        maps = []
        for conv, grad in zip(conv_output.numpy(), grads.numpy()):
            pooled = grad.mean(axis=(0, 1))
            for k in range(pooled.shape[-1]):
                conv[:, :, k] *= pooled[k]
            heatmap = np.maximum(conv.mean(axis=-1), 0)
            heatmap = heatmap / heatmap.max() if heatmap.max() > 0 else heatmap
            maps.append(cv2.resize(heatmap, images.shape[2:0:-1]))
        return np.stack(maps)

    def predict(images: np.ndarray) -> np.ndarray:
        return model(preprocess(images.astype(np.float32)), training=False).numpy()

    return predict, explain
