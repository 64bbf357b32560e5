"""The floor: what a prediction and a Grad-CAM cost at the least, on the same path as our signatures.

Two minimal SavedModels are built from the backbone the exporter uses (export/backbone.py), each one
tf.function and nothing else (no request checks, labels, top-k, PNG or shared functions):
  - plain forward: uint8 images -> cast -> the exporter's preprocessing -> the Keras model -> softmax;
  - minimal Grad-CAM: A = the backbone up to the target layer, logits = head(A) under a tape, gradient
    of the top-1 logit w.r.t. A, weights = its mean over h, w, map = ReLU(sum_k w_k A_k) / its max,
    bilinear resize to the input size.
Both are saved as the exporter saves (servable(), graph_safe_variable_names) and run as TF Serving
runs ours (SavedModelSession: LoadSavedModel, one Session::Run a call), so that `minimal Grad-CAM /
plain forward` is the least an in-graph explanation can cost over the prediction, and `our gradcam /
our predict` says how close ours comes to it.

The weights are built as the bench's flags say (--backbone, --weights, --target-layer, float32): the
exported model's own cannot be read cheaply from its SavedModel. Timing does not depend on the
weights' values; the heatmaps agree with ours only when the weights are the same (a weights file, a
.keras model, packaged or ImageNet weights), not with random ones (`heatmap_difference` tells).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import tempfile
import time
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    from camserve.serving.servables.session import SavedModelSession

FORWARD, GRADCAM = "plain forward", "minimal gradcam"


@dataclasses.dataclass
class MinimalModels:
    forward: SavedModelSession  # signature "predict": images -> probabilities
    gradcam: SavedModelSession  # signature "gradcam": images -> heatmap
    target_layer: str
    build_seconds: float  # to build, save and load both


def save_minimal_models(folder: pathlib.Path, backbone: str, weights: str, target_layer: str | None,
                        image_size: tuple[int, int]) -> str:
    """Save the plain forward as `folder`/forward and the minimal Grad-CAM as `folder`/gradcam;
    returns the target layer. `image_size`: our model's input, which the backbone must have."""
    import tensorflow as tf

    from camserve.export.backbone import load_backbone
    from camserve.export.savedmodel import captured_variables, graph_safe_variable_names, servable

    height, width = image_size
    split = load_backbone(backbone, weights, target_layer or None, height if height == width else None)
    if split.image_size != (height, width):
        raise ValueError(f"--backbone {backbone}: input {split.image_size}, the exported model's is {image_size}")
    images_spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")

    def features(images: tf.Tensor) -> tf.Tensor:
        return split.features(split.preprocess(tf.cast(images, tf.float32)), training=False)

    @tf.function(input_signature=[images_spec])
    def forward(images):
        return {"probabilities": tf.nn.softmax(split.head(features(images), training=False))}

    @tf.function(input_signature=[images_spec])
    def gradcam(images):
        activations = features(images)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(activations)
            top = tf.reduce_max(split.head(activations, training=False), axis=-1)
        weights = tf.reduce_mean(tape.gradient(top, activations), axis=(1, 2))
        maps = tf.nn.relu(tf.einsum("nhwk,nk->nhw", activations, weights))
        maps = tf.math.divide_no_nan(maps, tf.reduce_max(maps, axis=(1, 2), keepdims=True))  # 0, not NaN, if all 0
        return {"heatmap": tf.image.resize(maps[..., tf.newaxis], (height, width), method="bilinear")[..., 0]}

    for name, signature, function in (("forward", "predict", forward), ("gradcam", "gradcam", gradcam)):
        signatures = {signature: function.get_concrete_function()}
        variables = captured_variables(signatures)  # servable(): the root tracks them, as ours does
        with graph_safe_variable_names(variables):
            tf.saved_model.save(servable(variables), str(folder / name), signatures=signatures)
    return split.target_layer


@contextlib.contextmanager
def minimal_models(backbone: str, weights: str, target_layer: str | None,
                   image_size: tuple[int, int]) -> Iterator[MinimalModels]:
    """Both minimal models in a temporary folder, loaded with TF Serving's loader; closed on exit."""
    from camserve.serving.servables.session import SavedModelSession
    from camserve.serving.servables.session_config import session_config

    started = time.perf_counter()
    config = session_config()  # as ours: the settings of a server on this machine
    with tempfile.TemporaryDirectory(prefix="floor-") as folder:
        target = save_minimal_models(pathlib.Path(folder), backbone, weights, target_layer, image_size)
        with SavedModelSession(pathlib.Path(folder, "forward"), config=config) as forward, \
                SavedModelSession(pathlib.Path(folder, "gradcam"), config=config) as gradcam:
            yield MinimalModels(forward, gradcam, target, time.perf_counter() - started)


def floor_calls(ours: SavedModelSession, minimal: MinimalModels, methods: list[str],
                images: np.ndarray) -> dict[str, Callable[[], dict]]:
    """Zero-argument calls on one batch, each fetching only what it is compared on: probabilities
    from the forward passes, the float heatmap from the explanations (ours with class_index -1)."""
    class_index = np.full(len(images), -1, np.int32)
    calls = {
        FORWARD: lambda: minimal.forward.run_signature("predict", {"images": images}),
        "our predict": lambda: ours.run_signature("predict", {"images": images}, ["probabilities"]),
        GRADCAM: lambda: minimal.gradcam.run_signature("gradcam", {"images": images}),
    }
    for method in methods:  # as the client asks: the explain signature, the method in each row
        calls[f"our {method}"] = lambda m=method: ours.run_signature(
            "explain", {"images": images, "class_index": class_index, "method": np.array([m] * len(images), object)},
            ["heatmap"])
    return calls


def heatmap_difference(ours: SavedModelSession, minimal: MinimalModels, images: np.ndarray) -> float:
    """Largest |difference| between the minimal Grad-CAM's heatmaps and our gradcam signature's for
    `images`: ~1e-6 with the same weights (both are plain Grad-CAM of the top-1 class)."""
    mine = minimal.gradcam.run_signature("gradcam", {"images": images})["heatmap"]
    theirs = ours.run_signature("gradcam", {"images": images, "class_index": np.full(len(images), -1, np.int32)},
                                ["heatmap"])["heatmap"]
    return float(np.abs(mine - theirs).max())


def floor_methods(available: list[str], asked: list[str]) -> list[str]:
    """gradcam and cam where the model has them, then any other method the bench was asked about."""
    return [m for m in ("gradcam", "cam") if m in available] + [m for m in asked if m not in ("gradcam", "cam")]
