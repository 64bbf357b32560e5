"""The explanation pipeline: prediction and heatmap from pixels, the numeric core of every signature.

Read top to bottom, one request goes:
  pixels -> preprocess_input -> features A = backbone(x)        (forward, once)
         -> logits = head(A), under a tape watching A            (head only)
         -> target class c per image (-1 = the top-1 class)
         -> dy_c/dA (backward through the head only, never the backbone)
         -> method (each row's own): weights from A, dy_c/dA (and w_c for CAM) -> raw map Σ_k w_k A_k
         -> ReLU -> divide by the per-image max -> bilinear resize to the input size.
The rows of one batch may name different methods: the backbone and the head run once for all of
them, and each method present weights the channels of its own rows (`Explainer._by_method`).
A token layer [N,T,C] (a transformer's) is laid out as its patch grid after the head pass
(export/tokens.py): the methods see A and dy_c/dA as [N,h,w,C]. The `<method>_smooth` signatures of
--smooth take the principal component instead of the sum (eigen), or run four views of each image
and average their maps (aug): export/smoothing.py.
Guided Grad-CAM runs its rows through the network once more with guided ReLUs and backward down to
the pixels (export/guided.py); the fused maps of --target-layers (`<method>_fused`) take dy_c/dA_l at
every layer in one backward pass.
With --precision bfloat16 or float16 the layers of the backbone and head compute in that type
(`run`); A, dy_c/dA, the logits and everything the explanation computes from them stay float32.
Around it, outside any XLA cluster (signatures.py): the checks of the request (request_checks.py),
decoding, and the names, PNGs and `error` (string_outputs.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import keras
import tensorflow as tf

from .backbone import Backbone
from .guided import guided_relus
from .methods import Evidence, Method, channel_sum, top_channels, weighted_activations
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


def eight_bit(heatmap: tf.Tensor) -> tf.Tensor:
    """A map in [0, 1] as uint8 0..255 (`heatmap_uint8`, and the PNG's levels)."""
    return tf.cast(tf.round(heatmap * 255.0), tf.uint8)


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
    signature (`predict`, `explain`, `explain_fused`, `most_activated_maps`), run through `passes`.

    `explain` takes each row's method as an index into `methods`, so that one function (and one
    executor of TF Serving's session) serves every method: the backbone and the head run once for
    the batch, and each method present in it weights the channels of its own rows. The index
    `len(methods)` asks for the prediction alone: a row with an all-zero map, for which no method runs.
    """

    def __init__(self, backbone: Backbone, methods: Sequence[Method], *, top_k: int = 5, top_k_maps: int = 0,
                 feature_maps: int = 0, channels: Mapping[str, int] | None = None, passes: Passes | None = None,
                 compiled: bool = False):
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
        self.token_grid = backbone.token_grid
        self.features = backbone.features
        self.head = backbone.head
        self.fusion_segments = list(backbone.fusion_segments)
        self.fused_methods = fused if backbone.fusion_layers else []
        self.channels = dict(channels or {})
        self.cam_kernel = backbone.cam_kernel
        self.methods = {m.name: m for m in methods}
        self.image_size = backbone.image_size
        self.num_classes = backbone.num_classes
        self.top_k = min(top_k, backbone.num_classes)
        self.top_k_maps = min(top_k_maps, backbone.num_classes)
        self.feature_maps = min(feature_maps, int(backbone.features.output.shape[-1]))
        self._preprocess = backbone.preprocess
        self.passes = passes or Passes.inline(self.features, self.head, self.top_k_maps)
        self.compiled = compiled  # traced for XLA, which needs every shape known when it compiles

    def with_passes(self, passes: Passes | None = None, compiled: bool = False) -> Explainer:
        """The same explainer running `passes`; by default inline ones, traced afresh wherever it is traced.
        `compiled`: traced to be compiled by XLA (`_by_method`)."""
        return Explainer(self.split, list(self.methods.values()), top_k=self.top_k, top_k_maps=self.top_k_maps,
                         feature_maps=self.feature_maps, channels=self.channels, passes=passes, compiled=compiled)

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

    def explain(self, pixels: tf.Tensor, class_index: tf.Tensor, method_ids: tf.Tensor,
                smooth: tuple[str, ...] = ()) -> dict[str, tf.Tensor]:
        """The numeric core of the explain signatures: pixels [N,H,W,3] float32, class_index [N] (-1 = top-1),
        method_ids [N] (each row's method: its index in `methods`; len(methods): no map). With `--feature-maps`, also
        the target layer's most activated channels. `smooth` (export/smoothing.py): the explain_smooth
        signatures'; with aug the four views of an image explain the class the image itself explains,
        and no top-k or feature maps are made."""
        augment = "aug" in smooth
        n = tf.shape(pixels)[0]
        x = self._preprocess(augmented_views(pixels) if augment else pixels)
        layer_output = self.passes.backbone(x)
        if augment:
            class_index = tf.tile(target_class(run(self.head, layer_output[:n]), class_index), [AUG_VIEWS])
            method_ids = tf.tile(method_ids, [AUG_VIEWS])
        methods = list(self.methods.values())
        logits, target, targets, scores, gradients = self._head_pass(layer_output, class_index, method_ids, augment)

        def saliency(method: Method, rows: tf.Tensor) -> tf.Tensor:
            row_gradients = _rows(gradients, rows, targets.shape[1]) if method.needs_gradient else None
            return self._saliency(method, _rows(x, rows), _rows(layer_output, rows), _rows(targets, rows),
                                  _rows(scores, rows), row_gradients, "eigen" in smooth)

        maps = normalise(self._by_method(method_ids, saliency, [targets.shape[1], *self._grid_size()], methods))
        if augment:
            logits, target = logits[:n], target[:n]
            heatmap = normalise(merge_views(resize_maps(maps[:, 0], self.image_size)))
            lowres = resize_maps(heatmap, tf.shape(maps)[2:4])  # the average at the layer's resolution
            outputs = {**self._prediction(logits, target), **self._heatmaps(lowres, heatmap)}
            method_ids = method_ids[:n]
        else:
            outputs = {**self._prediction(logits, target), **self._heatmaps(maps[:, 0])}
        if self.top_k_maps and not augment:
            n, t, h, w = tf.unstack(tf.shape(maps))
            extra = resize_maps(tf.reshape(maps[:, 1:], [n * (t - 1), h, w]), self.image_size)
            outputs["heatmaps"] = tf.reshape(extra, [n, t - 1, *self.image_size])
            outputs["heatmaps_class_index"] = targets[:, 1:]
        if any(m.guided for m in methods):
            outputs["guided"] = self._guided(pixels, method_ids, target, outputs["heatmap"])
        if self.feature_maps and not smooth:
            outputs.update(self._feature_maps(layer_output))
        return outputs

    def _grid_size(self) -> list[int]:
        """[h, w] of the maps at the target layer."""
        if self.token_grid:
            return [self.token_grid.height, self.token_grid.width]
        return [int(d) for d in self.features.output.shape[1:3]]

    def _head_pass(self, layer_output: tf.Tensor, class_index: tf.Tensor, method_ids: tf.Tensor,
                   augment: bool) -> HeadPass:
        """The head under a tape, with dy_c/dA when a row's method needs it (an empty gradient otherwise)."""
        needs = [m.needs_gradient for m in self.methods.values()] + [False]  # the prediction alone: none
        if augment:
            forward = functools.partial(head_pass, self.head, 0, gradients=False)
            backward = functools.partial(head_pass, self.head, 0, gradients=True)
        else:
            forward, backward = self.passes.head_forward, self.passes.head_backward
        if not any(needs):
            return forward(layer_output, class_index)

        def without_gradient() -> HeadPass:
            logits, target, targets, scores, _ = forward(layer_output, class_index)
            rows = tf.size(targets) if self.compiled else 0  # XLA's branches return the same shapes
            return logits, target, targets, scores, tf.zeros([rows, *layer_output.shape[1:]])

        some = tf.reduce_any(tf.gather(tf.constant(needs), method_ids))
        return tf.cond(some, lambda: backward(layer_output, class_index), without_gradient)

    def _by_method(self, method_ids: tf.Tensor, compute: Callable[[Method, tf.Tensor], tf.Tensor],
                   row_shape: list[int], methods: Sequence[Method],
                   computes: Callable[[Method], bool] = lambda method: True) -> tf.Tensor:
        """Each row's `compute(method, rows)` [rows, *row_shape] for the method of its row (its index in
        `methods`), zeros in the rows of index len(methods), the prediction alone, and of the methods
        that `computes` rules out: each method present computes its own rows (a tf.cond skips the others)
        and the results are put back in row order. For XLA, whose programs need every shape known when
        they compile, a loop over the rows instead, each running its own method (tf.switch_case)."""
        if self.compiled:
            def row(i: tf.Tensor) -> tf.Tensor:
                branches = [functools.partial(lambda m: compute(m, i[tf.newaxis])[0], m) if computes(m)
                            else (lambda: tf.zeros(row_shape)) for m in methods]
                return tf.switch_case(method_ids[i], [*branches, lambda: tf.zeros(row_shape)])

            return tf.map_fn(row, tf.range(tf.shape(method_ids)[0]), fn_output_signature=tf.TensorSpec(row_shape))
        result = tf.zeros([tf.shape(method_ids)[0], *row_shape])
        for index, method in enumerate(methods):
            if not computes(method):
                continue
            rows = tf.where(tf.equal(method_ids, index))[:, 0]
            values = tf.cond(tf.size(rows) > 0, lambda method=method, rows=rows: compute(method, rows),
                             lambda: tf.zeros([0, *row_shape]))
            result = tf.tensor_scatter_nd_update(result, rows[:, tf.newaxis], values)
        return result

    def explain_fused(self, pixels: tf.Tensor, class_index: tf.Tensor, method_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        """The numeric core of the explain_fused signatures: each row's method (its index in `fused_methods`,
        or len(fused_methods) for no map) at every --target-layers layer from one backward pass, the
        layers' maps fused (`fuse`)."""
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

        def fused(method: Method, rows: tf.Tensor) -> tf.Tensor:
            evidence = [(tf.gather(a, rows), tf.gather(g, rows)) for a, g in zip(activations, gradients)]
            return fuse([normalise(channel_sum(weighted_activations(a, method.weights(Evidence(a, g, None)))))
                         for a, g in evidence])

        finest = max((a.shape[1:3] for a in activations), key=lambda hw: hw[0] * hw[1])
        maps = self._by_method(method_ids, fused, list(finest), [self.methods[name] for name in self.fused_methods])
        return {**self._prediction(logits, target), **self._heatmaps(maps)}

    def _feature_maps(self, layer_output: tf.Tensor) -> dict[str, tf.Tensor]:
        """The `feature_maps` debug view: the most activated channels of the target layer, each max-normalised."""
        activations = self._grid(layer_output)
        channels = top_channels(activations, self.feature_maps)  # [N, F]
        chosen = tf.transpose(tf.gather(activations, channels, axis=3, batch_dims=1), [0, 3, 1, 2])
        return {"feature_maps": normalise(chosen), "feature_channels": channels}

    def _heatmaps(self, maps: tf.Tensor, heatmap: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        """The map of each image [N,h,w] at the input size (resized, unless given), as float and 8-bit,
        and as it was."""
        heatmap = resize_maps(maps, self.image_size) if heatmap is None else heatmap
        return {"heatmap": heatmap, "heatmap_uint8": eight_bit(heatmap), "heatmap_lowres": maps}

    def _guided(self, pixels: tf.Tensor, method_ids: tf.Tensor, target: tf.Tensor, heatmap: tf.Tensor) -> tf.Tensor:
        """Guided Grad-CAM's picture [N,H,W,3] (zeros in the rows of other methods): the row's map times
        guided backpropagation, dy_c/d(pixels) through guided ReLUs, from a forward pass of its own (the
        shared one runs plain ReLUs, which Grappler fuses with their convolutions). With respect to the
        RGB pixels, so that the picture keeps its colours whatever channel order the preprocessing uses."""

        def compute(method: Method, rows: tf.Tensor) -> tf.Tensor:
            own = tf.gather(pixels, rows)
            with tf.GradientTape(watch_accessed_variables=False) as tape, guided_relus(self.features, self.head):
                tape.watch(own)
                logits = run(self.head, run(self.features, self._preprocess(own)))
                score = tf.gather(logits, tf.gather(target, rows), batch_dims=1)
            return tf.gather(heatmap, rows)[..., tf.newaxis] * tape.gradient(score, own)

        return self._by_method(method_ids, compute, [*self.image_size, 3], list(self.methods.values()),
                               computes=lambda method: method.guided)

    def _saliency(self, method: Method, x, layer_output, targets, scores, gradients, eigen: bool) -> tf.Tensor:
        """Raw maps [N, T, h, w], one per target class: the method's weights of A applied to each (image,
        class), summed over the channels, or their principal component (`eigen`)."""
        n, t = tf.shape(targets)[0], targets.shape[1]
        class_weights = None
        if method.needs_gap_dense_head:
            # Gather the few columns first: transposing the whole [K, C] kernel costs more than CAM.
            class_weights = tf.transpose(tf.gather(self.cam_kernel, tf.reshape(targets, [-1]), axis=1))
        if gradients is not None and not method.needs_gradient:
            gradients = None  # (an empty tensor when no row of the batch needs one)
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


def _rows(batch: tf.Tensor, rows: tf.Tensor, per_row: int = 1) -> tf.Tensor:
    """The given rows of a batch [N, ...]; of a batch [N*per_row, ...] that holds `per_row` entries per
    row (dy_c/dA of several target classes), the entries of those rows."""
    if per_row == 1:
        return tf.gather(batch, rows)
    grouped = tf.reshape(batch, [-1, per_row, *batch.shape[1:]])
    return tf.reshape(tf.gather(grouped, rows), [-1, *batch.shape[1:]])
