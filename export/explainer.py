"""The explanation pipeline: prediction and heatmap from pixels, the numeric core of every signature.

Read top to bottom, one request goes:
  pixels -> preprocess_input -> features A = backbone(x)        (forward, once)
         -> logits = head(A), under a tape watching A            (head only)
         -> target class c per image (-1 = the top-1 class)
         -> dy_c/dA (backward through the head only, never the backbone)
         -> method: weights from A, dy_c/dA (and w_c for CAM) -> raw map Σ_k w_k A_k
         -> ReLU -> divide by the per-image max -> bilinear resize to the input size.
A token layer [N,T,C] (a transformer's) is laid out as its patch grid after the head pass
(export/tokens.py): the methods see A and dy_c/dA as [N,h,w,C]. The `<method>_smooth` signatures of
--smooth take the principal component instead of the sum (eigen), or run four views of each image
and average their maps (aug): export/smoothing.py.
Guided Grad-CAM runs the backbone with guided ReLUs (same forward values) and adds a guided backward
pass through the whole network down to the pixels (export/guided.py); the fused maps of
--target-layers (`<method>_fused`) take dy_c/dA_l at every layer in one backward pass.
With --precision bfloat16 or float16 the layers of the backbone and head compute in that type
(`run`); A, dy_c/dA, the logits and everything the explanation computes from them stay float32.
Around it, outside any XLA cluster (signatures.py): the checks of the request (request_checks.py),
decoding, and the names, PNGs and `error` (string_outputs.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import keras
import tensorflow as tf

from .backbone import Backbone
from .guided import guided_relus
from .methods import Evidence, Method, channel_sum, top_channels, weighted_activations
from .options import ExportOptions
from .smoothing import AUG_VIEWS, augmented_views, eigen_projection, merge_views

# LayerCAM (Jiang et al. 2021, eq. 9): each layer's normalised map M is scaled to tanh(γ M) before
# the element-wise max, which lifts the weaker maps of shallow layers; γ = 2 as in the paper.
FUSION_GAMMA = 2.0

# What the head under a tape gives (`head_pass`): logits [N,C], target [N], targets [N,T], scores
# [N,T] and dy_c/dA [N*T,h,w,K] (None without gradients).
HeadPass = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor | None]


def run(model: keras.Model, x: tf.Tensor) -> tf.Tensor:
    """`model(x)` in inference mode, as float32. With --precision the layers compute in bfloat16 or
    float16; the cast back makes the gradient that reaches A float32 too, before pooling and weighting."""
    return tf.cast(model(x, training=False), tf.float32)


def normalise(raw_maps: tf.Tensor) -> tf.Tensor:
    """ReLU, then divide each map [..., h, w] by its maximum; an all-zero map stays zero (no NaN)."""
    positive = tf.nn.relu(raw_maps)
    peak = tf.reduce_max(positive, axis=(-2, -1), keepdims=True)
    return tf.math.divide_no_nan(positive, peak)


def resize_maps(maps: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Bilinear (half-pixel centres, as cv2.resize) resize of [N,h,w] maps to [N,H,W]."""
    return tf.image.resize(maps[..., tf.newaxis], size, method="bilinear")[..., 0]


def fuse(maps: list[tf.Tensor]) -> tf.Tensor:
    """LayerCAM's fusion of normalised maps [N,h_l,w_l]: tanh(γ M_l), resized to the finest map's
    size, element-wise max, normalised again."""
    size = max((tuple(m.shape[1:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    scaled = [resize_maps(tf.tanh(FUSION_GAMMA * m), size) for m in maps]
    return normalise(tf.reduce_max(tf.stack(scaled), axis=0))


def target_class(logits: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
    """The class each image explains: class_index, or the predicted class where it is -1."""
    return tf.where(class_index < 0, tf.argmax(logits, axis=-1, output_type=tf.int32), class_index)


def head_pass(head: keras.Model, top_k_maps: int, activations: tf.Tensor, class_index: tf.Tensor,
              gradients: bool) -> HeadPass:
    """The head under a tape watching A, with dy_c/dA or without. Column 0 of the targets is the
    class explained; then the `top_k_maps` top classes."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(activations)
        logits = run(head, activations)
        target = target_class(logits, class_index)
        targets = target[:, tf.newaxis]
        if top_k_maps:
            top = tf.math.top_k(logits, k=top_k_maps).indices
            targets = tf.concat([targets, top], axis=1)
        scores = tf.gather(logits, targets, batch_dims=1)
    if not gradients:
        return logits, target, targets, scores, None
    if targets.shape[1] == 1:  # images are independent in inference mode: d(sum of scores)/dA is per image
        return logits, target, targets, scores, tape.gradient(scores, activations)
    jacobian = tape.batch_jacobian(scores, activations)  # one backward pass through the head per target class
    return logits, target, targets, scores, tf.reshape(jacobian, tf.concat([[-1], tf.shape(activations)[1:]], 0))


@dataclasses.dataclass(frozen=True)
class Passes:
    """The passes every method runs alike: the backbone's forward pass (preprocessed x -> A), and the
    head under a tape (A, class_index -> HeadPass) without dy_c/dA (`head_forward`) or with it
    (`head_backward`).

    Inline ones (`Passes.inline`) are traced wherever they are called, under the layers' dtype policy
    of that moment (export/precision.py traces them under float32); signatures.py makes each one
    function shared by every signature.
    """

    backbone: Callable[[tf.Tensor], tf.Tensor]
    head_forward: Callable[[tf.Tensor, tf.Tensor], HeadPass]
    head_backward: Callable[[tf.Tensor, tf.Tensor], HeadPass]

    @classmethod
    def inline(cls, features: keras.Model, head: keras.Model, top_k_maps: int) -> Passes:
        return cls(
            backbone=functools.partial(run, features),
            head_forward=functools.partial(head_pass, head, top_k_maps, gradients=False),
            head_backward=functools.partial(head_pass, head, top_k_maps, gradients=True),
        )


class Explainer(tf.Module):
    """A backbone split at its target layer and the methods that explain it: the numeric core of each
    signature (`predict`, `explain`, `explain_fused`, `most_activated_maps`), run through `passes`."""

    def __init__(self, backbone: Backbone, methods: list[Method], options: ExportOptions, passes: Passes | None = None):
        super().__init__(name="explainer")
        for method in methods:
            if method.needs_gap_dense_head and backbone.cam_kernel is None:
                raise ValueError(
                    f"method {method.name!r} needs a head of global average pooling + one dense layer "
                    f"after {backbone.target_layer!r}; this model has "
                    f"{[layer.name for layer in backbone.head.layers[1:]]}: use gradcam instead"
                )
        fused = [m.name for m in methods if m.fusable]
        if backbone.fusion_layers and not fused:
            raise ValueError(
                "--target-layers fuses the maps of gradient methods (gradcam, layercam, ...): none is in --methods"
            )
        self.split = backbone
        self.options = options
        self.token_grid = backbone.token_grid
        self.features = backbone.features
        self.head = backbone.head
        self.fusion_segments = list(backbone.fusion_segments)
        self.fused_methods = fused if backbone.fusion_layers else []
        self.channels = options.channels
        self.cam_kernel = backbone.cam_kernel
        self.methods = {m.name: m for m in methods}
        self.image_size = backbone.image_size
        self.num_classes = backbone.num_classes
        self.top_k = min(options.top_k, backbone.num_classes)
        self.top_k_maps = min(options.top_k_maps, backbone.num_classes)
        self.feature_maps = min(options.feature_maps, int(backbone.features.output.shape[-1]))
        self._preprocess = backbone.preprocess
        self.passes = passes or Passes.inline(self.features, self.head, self.top_k_maps)

    def with_passes(self, passes: Passes | None = None) -> Explainer:
        """The same explainer running `passes`; by default inline ones, traced afresh wherever it is traced."""
        return Explainer(self.split, list(self.methods.values()), self.options, passes)

    def _forward(self, pixels: tf.Tensor) -> tf.Tensor:
        return self.passes.backbone(self._preprocess(pixels))

    def _grid(self, layer_output: tf.Tensor) -> tf.Tensor:
        """A [N,h,w,K] of the target layer's output: itself, or a token layer's patch tokens as their grid."""
        return self.token_grid.grid(layer_output) if self.token_grid else layer_output

    def _prediction(self, logits: tf.Tensor, target: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.nn.softmax(logits)
        top_scores, top_indices = tf.math.top_k(probabilities, k=self.top_k)
        return {
            "probabilities": probabilities,
            "logits": logits,
            "class_index": target,
            "score": tf.gather(logits, target, batch_dims=1),
            "top_k_indices": top_indices,
            "top_k_scores": top_scores,
        }

    def predict(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        """The numeric core of `predict`: pixels [N,H,W,3] float32."""
        logits = run(self.head, self._forward(pixels))
        return self._prediction(logits, tf.argmax(logits, axis=-1, output_type=tf.int32))

    def explain(self, method: Method, pixels: tf.Tensor, class_index: tf.Tensor,
                smooth: tuple[str, ...] = ()) -> dict[str, tf.Tensor]:
        """The numeric core of a method's signature: pixels [N,H,W,3] float32, class_index [N] (-1 = top-1);
        `smooth` (export/smoothing.py) for its `<method>_smooth` signature. With aug the four views of an
        image explain the class the image itself explains, and no top-k maps are made."""
        augment = "aug" in smooth
        n = tf.shape(pixels)[0]
        # Guided Grad-CAM differentiates this forward pass down to the pixels, through guided ReLUs
        # (same forward values): the pixel tape records it; for other methods it records nothing used.
        with tf.GradientTape(watch_accessed_variables=False) as pixel_tape, \
                guided_relus(self.features) if method.guided else contextlib.nullcontext():
            pixel_tape.watch(pixels)
            x = self._preprocess(augmented_views(pixels) if augment else pixels)
            layer_output = run(self.features, x) if method.guided else self.passes.backbone(x)
        if augment:
            class_index = tf.tile(target_class(run(self.head, layer_output[:n]), class_index), [AUG_VIEWS])
            head = functools.partial(head_pass, self.head, 0, gradients=method.needs_gradient)
        else:
            head = self.passes.head_backward if method.needs_gradient else self.passes.head_forward
        logits, target, targets, scores, gradients = head(layer_output, class_index)
        maps = normalise(self._saliency(method, x, layer_output, targets, scores, gradients, "eigen" in smooth))
        if augment:
            logits, target = logits[:n], target[:n]
            heatmap = normalise(merge_views(resize_maps(maps[:, 0], self.image_size)))
            lowres = resize_maps(heatmap, tf.shape(maps)[2:4])  # the average at the layer's resolution
            outputs = {**self._prediction(logits, target), **self._heatmaps(lowres, heatmap)}
        else:
            outputs = {**self._prediction(logits, target), **self._heatmaps(maps[:, 0])}
        if self.top_k_maps and not augment:
            n, t, h, w = tf.unstack(tf.shape(maps))
            extra = resize_maps(tf.reshape(maps[:, 1:], [n * (t - 1), h, w]), self.image_size)
            outputs["heatmaps"] = tf.reshape(extra, [n, t - 1, *self.image_size])
            outputs["heatmaps_class_index"] = targets[:, 1:]
        if method.guided:
            guided = self._guided_backprop(pixel_tape, pixels, layer_output, target)
            outputs["guided"] = outputs["heatmap"][..., tf.newaxis] * guided
        return outputs

    def explain_fused(self, method: Method, pixels: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        """The method at every --target-layers layer from one backward pass, maps fused (`fuse`)."""
        first, *links, head = self.fusion_segments
        activations = [run(first, self._preprocess(pixels))]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(activations[0])
            for link in links:
                activations.append(run(link, activations[-1]))
            logits = run(head, activations[-1])
            target = target_class(logits, class_index)
            score = tf.gather(logits, target, batch_dims=1)
        gradients = tape.gradient(score, activations)
        maps = [normalise(channel_sum(weighted_activations(a, method.weights(Evidence(a, g, None)))))
                for a, g in zip(activations, gradients)]
        return {**self._prediction(logits, target), **self._heatmaps(fuse(maps))}

    def most_activated_maps(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        """The `feature_maps` debug view: the most activated channels of the target layer, each max-normalised."""
        activations = self._grid(self._forward(pixels))
        channels = top_channels(activations, self.feature_maps)  # [N, F]
        chosen = tf.transpose(tf.gather(activations, channels, axis=3, batch_dims=1), [0, 3, 1, 2])
        return {"feature_maps": normalise(chosen), "feature_channels": channels}

    def _heatmaps(self, maps: tf.Tensor, heatmap: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        """The map of each image [N,h,w] at the input size (resized, unless given), as float and 8-bit,
        and as it was."""
        heatmap = resize_maps(maps, self.image_size) if heatmap is None else heatmap
        return {
            "heatmap": heatmap,
            "heatmap_uint8": tf.cast(tf.round(heatmap * 255.0), tf.uint8),
            "heatmap_lowres": maps,
        }

    def _guided_backprop(self, pixel_tape, pixels, layer_output, target) -> tf.Tensor:
        """dy_c/d(pixels) [N,H,W,3] with guided ReLUs: the head once more, guided, then a backward pass
        through the whole network along the forward pass `pixel_tape` recorded (of the image itself,
        the first N rows, when it ran the augmented views too). With respect to the RGB pixels, so that
        the picture keeps its colours whatever channel order the preprocessing uses."""
        with pixel_tape, guided_relus(self.head):
            own = layer_output[: tf.shape(pixels)[0]]
            score = tf.gather(run(self.head, own), target, batch_dims=1)
        return pixel_tape.gradient(score, pixels)

    def _saliency(self, method: Method, x, layer_output, targets, scores, gradients, eigen: bool) -> tf.Tensor:
        """Raw maps [N, T, h, w], one per target class: the method's weights of A applied to each (image,
        class), summed over the channels, or their principal component (`eigen`)."""
        n, t = tf.shape(targets)[0], targets.shape[1]
        class_weights = None
        if method.needs_gap_dense_head:
            # Gather the few columns first: transposing the whole [K, C] kernel costs more than CAM.
            class_weights = tf.transpose(tf.gather(self.cam_kernel, tf.reshape(targets, [-1]), axis=1))
        if t > 1:
            layer_output = tf.repeat(layer_output, t, axis=0)
            x = tf.repeat(x, t, axis=0)
        activations = self._grid(layer_output)
        evidence = Evidence(
            activations, None if gradients is None else self._grid(gradients), class_weights,
            targets=tf.reshape(targets, [-1]), scores=tf.reshape(scores, [-1]), inputs=x,
            features=self.passes.backbone,
            head=lambda a: run(self.head, a),
            layer_output=layer_output,
            channels=self.channels.get(method.name, 0),
        )
        weighted = weighted_activations(activations, method.weights(evidence))
        raw = eigen_projection(weighted) if eigen else channel_sum(weighted)
        return tf.reshape(raw, tf.concat([[n, t], tf.shape(raw)[1:]], 0))
