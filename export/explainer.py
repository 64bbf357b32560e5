"""The explainer graph: prediction and heatmap in one TensorFlow function per signature.

Read top to bottom, one request goes:
  pixels -> preprocess_input -> features A = backbone(x)        (forward, once)
         -> logits = head(A), under a tape watching A            (head only)
         -> target class c per image (-1 = the top-1 class)
         -> dy_c/dA (backward through the head only, never the backbone)
         -> method: raw map from A, dy_c/dA (and w_c for CAM)
         -> ReLU -> divide by the per-image max -> bilinear resize to the input size.
Guided Grad-CAM runs the backbone with guided ReLUs (same forward values) and adds a guided backward
pass through the whole network down to the pixels (export/guided.py); the fused maps of
--target-layers (`<method>_fused`) take dy_c/dA_l at every layer in one backward pass.
With --precision bfloat16 or float16 the layers of the backbone and head compute in that type
(`run`); A, dy_c/dA, the logits and everything the explanation computes from them stay float32.
Around it, outside any XLA cluster: the checks of the request, decoding, names, PNG, `error`.
"""

from __future__ import annotations

import contextlib
import functools
import math

import keras
import tensorflow as tf

from client.outputs import default_output_sets
from export.backbone import Backbone
from export.decode import decode_images
from export.guided import guided_relus
from export.methods import Evidence, Method, top_channels
from export.options import ExportOptions
from export.signature_defs import COMPACT

# LayerCAM (Jiang et al. 2021, eq. 9): each layer's normalised map M is scaled to tanh(γ M) before
# the element-wise max, which lifts the weaker maps of shallow layers; γ = 2 as in the paper.
FUSION_GAMMA = 2.0
PNG_COMPRESSION = 2  # zlib level of the PNG outputs (see Explainer._pngs)


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


def guided_image(guided: tf.Tensor) -> tf.Tensor:
    """The usual picture of a gradient image [N,H,W,3] as uint8: each image standardised, scaled
    to a standard deviation of 0.1 around grey (0.5), clipped."""
    mean, variance = tf.nn.moments(guided, axes=(1, 2, 3), keepdims=True)
    picture = (guided - mean) / (tf.sqrt(variance) + 1e-5) * 0.1 + 0.5
    return tf.cast(tf.round(tf.clip_by_value(picture, 0.0, 1.0) * 255.0), tf.uint8)


class Explainer(tf.Module):
    """Holds the split backbone and builds every serving signature from one pipeline."""

    def __init__(
        self,
        backbone: Backbone,
        methods: list[Method],
        labels: list[str],
        options: ExportOptions,
    ):
        super().__init__(name="explainer")
        if len(labels) != backbone.num_classes:
            raise ValueError(f"{len(labels)} labels for a model with {backbone.num_classes} classes")
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
        self.features = backbone.features
        self.head = backbone.head
        self.fusion_segments = list(backbone.fusion_segments)
        self.fused_methods = fused if backbone.fusion_layers else []
        self.channels = options.channels
        self.cam_kernel = backbone.cam_kernel
        self.labels = tf.constant(labels)
        self.methods = {m.name: m for m in methods}
        self.image_size = backbone.image_size
        self.num_classes = backbone.num_classes
        self.top_k = min(options.top_k, backbone.num_classes)
        self.max_batch_size = options.max_batch_size
        self.max_image_pixels = options.max_image_pixels
        self.top_k_maps = min(options.top_k_maps, backbone.num_classes)
        self.feature_maps = min(options.feature_maps, int(backbone.features.output.shape[-1]))
        self._preprocess = backbone.preprocess
        self._jit_compile = options.jit_compile
        # The backbone's forward pass, traced where it is called (under the layers' dtype policy of the
        # moment: export/precision.py switches it), until `signatures` makes it one shared function.
        self._backbone = functools.partial(run, self.features)
        # The head under a tape, with dy_c/dA (backward) or without (forward), which every method runs
        # alike: inline until `signatures` makes them shared functions too.
        self._head_forward = functools.partial(self._head_pass, gradients=False)
        self._head_backward = functools.partial(self._head_pass, gradients=True)

    # --- the pipeline -------------------------------------------------------------------------

    def _forward(self, pixels: tf.Tensor) -> tf.Tensor:
        return self._backbone(self._preprocess(pixels))

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

    def _predict(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = run(self.head, self._forward(pixels))
        return self._prediction(logits, tf.argmax(logits, axis=-1, output_type=tf.int32))

    def explain(self, method: Method, pixels: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        """The numeric core of a method's signature: pixels [N,H,W,3] float32, class_index [N] (-1 = top-1)."""
        # Guided Grad-CAM differentiates this forward pass down to the pixels, through guided ReLUs
        # (same forward values): the pixel tape records it; for other methods it records nothing used.
        with tf.GradientTape(watch_accessed_variables=False) as pixel_tape, \
                guided_relus(self.features) if method.guided else contextlib.nullcontext():
            pixel_tape.watch(pixels)
            x = self._preprocess(pixels)
            activations = run(self.features, x) if method.guided else self._backbone(x)
        head = self._head_backward if method.needs_gradient else self._head_forward
        logits, target, targets, scores, gradients = head(activations, class_index)
        maps = normalise(self._saliency(method, x, activations, targets, scores, gradients))
        outputs = {**self._prediction(logits, target), **self._heatmaps(maps[:, 0])}
        if self.top_k_maps:
            n, t, h, w = tf.unstack(tf.shape(maps))
            extra = resize_maps(tf.reshape(maps[:, 1:], [n * (t - 1), h, w]), self.image_size)
            outputs["heatmaps"] = tf.reshape(extra, [n, t - 1, *self.image_size])
            outputs["heatmaps_class_index"] = targets[:, 1:]
        if method.guided:
            guided = self._guided_backprop(pixel_tape, pixels, activations, target)
            outputs["guided"] = outputs["heatmap"][..., tf.newaxis] * guided
        return outputs

    def _explain_fused(self, method: Method, pixels: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        """The method at every --target-layers layer from one backward pass, maps fused (`fuse`)."""
        first, *links, head = self.fusion_segments
        activations = [run(first, self._preprocess(pixels))]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(activations[0])
            for link in links:
                activations.append(run(link, activations[-1]))
            logits = run(head, activations[-1])
            target = self._target(logits, class_index)
            score = tf.gather(logits, target, batch_dims=1)
        gradients = tape.gradient(score, activations)
        maps = [normalise(method.saliency(Evidence(a, g, None))) for a, g in zip(activations, gradients)]
        return {**self._prediction(logits, target), **self._heatmaps(fuse(maps))}

    def _head_pass(self, activations: tf.Tensor, class_index: tf.Tensor, gradients: bool):
        """(logits, target [N], targets [N, T], scores [N, T], dy_c/dA [N*T, h, w, C] or None): the head
        under a tape watching A. Column 0 of the targets is the class explained; then the top classes
        when --top-k-maps asks for them."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(activations)
            logits = run(self.head, activations)
            target = self._target(logits, class_index)
            targets = target[:, tf.newaxis]
            if self.top_k_maps:
                top = tf.math.top_k(logits, k=self.top_k_maps).indices
                targets = tf.concat([targets, top], axis=1)
            scores = tf.gather(logits, targets, batch_dims=1)
        if not gradients:
            return logits, target, targets, scores, None
        if targets.shape[1] == 1:  # images are independent in inference mode: d(sum of scores)/dA is per image
            return logits, target, targets, scores, tape.gradient(scores, activations)
        jacobian = tape.batch_jacobian(scores, activations)  # one backward pass through the head per target class
        return logits, target, targets, scores, tf.reshape(jacobian, tf.concat([[-1], tf.shape(activations)[1:]], 0))

    @staticmethod
    def _target(logits: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
        """The class each image explains: class_index, or the predicted class where it is -1."""
        return tf.where(class_index < 0, tf.argmax(logits, axis=-1, output_type=tf.int32), class_index)

    def _heatmaps(self, maps: tf.Tensor) -> dict[str, tf.Tensor]:
        """The map of each image [N,h,w] at the input size, as float and 8-bit, and as it was."""
        heatmap = resize_maps(maps, self.image_size)
        return {
            "heatmap": heatmap,
            "heatmap_uint8": tf.cast(tf.round(heatmap * 255.0), tf.uint8),
            "heatmap_lowres": maps,
        }

    def _guided_backprop(self, pixel_tape, pixels, activations, target) -> tf.Tensor:
        """dy_c/d(pixels) [N,H,W,3] with guided ReLUs: the head once more, guided, then a backward pass
        through the whole network along the forward pass `pixel_tape` recorded. With respect to the RGB
        pixels, so that the picture keeps its colours whatever channel order the preprocessing uses."""
        with pixel_tape, guided_relus(self.head):
            score = tf.gather(run(self.head, activations), target, batch_dims=1)
        return pixel_tape.gradient(score, pixels)

    def _saliency(self, method: Method, x, activations, targets, scores, gradients) -> tf.Tensor:
        """Raw maps [N, T, h, w], one per target class: the method applied to each (image, class)."""
        n, t = tf.shape(targets)[0], targets.shape[1]
        class_weights = None
        if method.needs_gap_dense_head:
            # Gather the few columns first: transposing the whole [K, C] kernel costs more than CAM.
            class_weights = tf.transpose(tf.gather(self.cam_kernel, tf.reshape(targets, [-1]), axis=1))
        if t > 1:
            activations = tf.repeat(activations, t, axis=0)
            x = tf.repeat(x, t, axis=0)
        evidence = Evidence(
            activations, gradients, class_weights, targets=tf.reshape(targets, [-1]),
            scores=tf.reshape(scores, [-1]), inputs=x,
            features=self._backbone,
            head=lambda a: run(self.head, a),
            channels=self.channels.get(method.name, 0),
        )
        raw = method.saliency(evidence)
        return tf.reshape(raw, tf.concat([[n, t], tf.shape(raw)[1:]], 0))

    def _feature_maps(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        """The seed's debug view: the most activated channels of the target layer, each max-normalised."""
        activations = self._forward(pixels)
        channels = top_channels(activations, self.feature_maps)  # [N, F]
        chosen = tf.transpose(tf.gather(activations, channels, axis=3, batch_dims=1), [0, 3, 1, 2])
        return {"feature_maps": normalise(chosen), "feature_channels": channels}

    def _presented(self, outputs: dict[str, tf.Tensor], errors: tf.Tensor) -> dict[str, tf.Tensor]:
        """Add the names and errors outside the numeric core: XLA has no strings."""
        outputs = {**outputs, "error": errors}
        if "class_index" in outputs:
            outputs["class_label"] = tf.gather(self.labels, outputs["class_index"])
            outputs["top_k_labels"] = tf.gather(self.labels, outputs["top_k_indices"])
        return outputs

    @staticmethod
    def _pngs(images: tf.Tensor) -> tf.Tensor:
        """uint8 images [N,H,W,C] (C = 1: the heatmaps; 3: Guided Grad-CAM's pictures) as PNGs [N].

        Compact on any server: TF Serving sends uint8 tensors as one varint per value (~100 KB for a
        224x224 map); a PNG string travels as its bytes (~5-25 KB). The outputs' names end in "_bytes"
        because TF Serving's REST API writes a string output as {"b64": ...} only then
        (util/json_tensor.cc); any other string goes out raw, which PNG bytes cannot. zlib level 2: a
        quarter of the default level's time (0.9 vs 3.8 ms a 224x224 map in the graph, one CPU core), ~15 % larger.
        """
        return tf.map_fn(lambda image: tf.io.encode_png(image, compression=PNG_COMPRESSION), images,
                         fn_output_signature=tf.string)

    # --- the input contract (outside any XLA cluster, so it always runs) ----------------------
    #
    # TF Serving feeds whatever a request holds: it checks neither shapes nor batch sizes against
    # the signature, so the graph checks its own contract. A fault of the request as a whole
    # (shape, batch size, class_index length) fails the call with INVALID_ARGUMENT. A fault of one
    # image (refused from its header or undecodable: decode.py; class out of range) only marks its
    # row in the `error` output, and the row is computed on a stand-in (zeros, the predicted
    # class): with TF Serving's batching, one caller's bad image must not fail the callers batched
    # with it. A call whose rows are all faulty fails with INVALID_ARGUMENT, so a lone bad request
    # still gets a plain error.

    def _checked_request(self, x: tf.Tensor, class_index: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor | None]:
        """`x` and `class_index` in their declared shapes, once the request as a whole is valid."""
        height, width = self.image_size
        if x.dtype == tf.string:
            name, inner, expected = "image_bytes", [], "[N] (one encoded image per element)"
        else:
            name, inner = "images", [height, width, 3]
            expected = f"[N,{height},{width},3] (N RGB images of {height}x{width}, uint8)"
        shape = tf.shape(x, out_type=tf.int64)
        padded = tf.pad(shape, [[0, len(inner) + 1]])  # any rank, even 0, has the dims to compare
        # Grappler folds a rank test to the rank the signature declares, so the rank is checked
        # through the element count instead: [N, *inner] holds exactly N * prod(inner) values.
        shape_ok = tf.logical_and(
            tf.reduce_all(tf.equal(padded[1 : 1 + len(inner)], tf.constant(inner, tf.int64))),
            tf.equal(tf.size(x, out_type=tf.int64), padded[0] * math.prod(inner)),
        )
        got = tf.strings.reduce_join(tf.strings.as_string(shape), separator=",")
        message = tf.strings.join([f"{name}: expected shape {expected}, got [", got, "]"])
        shape_check = tf.debugging.Assert(shape_ok, [message])
        with tf.control_dependencies([shape_check]):
            x = tf.reshape(x, [-1, *inner])
            batch = tf.shape(x)[0]
        checks = [
            tf.debugging.Assert(batch > 0, ["empty batch: send at least one image"]),
            tf.debugging.Assert(
                batch <= self.max_batch_size,
                [tf.strings.format(f"too many images in one request: {{}}; the limit is {self.max_batch_size}", batch)],
            ),
        ]
        if class_index is not None:
            checks.append(
                tf.debugging.Assert(
                    tf.equal(tf.size(class_index), batch),
                    [
                        tf.strings.format(
                            "class_index needs one entry per image: {} images, class_index of shape {}",
                            (batch, tf.shape(class_index)),
                        )
                    ],
                )
            )
        with tf.control_dependencies(checks):
            x = tf.identity(x)
            if class_index is not None:
                class_index = tf.reshape(class_index, [-1])
        return x, class_index

    def _class_errors(self, class_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(class_index with faulty entries replaced by -1, per-row error message or "")."""
        bad = tf.logical_or(class_index < -1, class_index >= self.num_classes)
        message = tf.strings.join(
            [
                "class_index ",
                tf.strings.as_string(class_index),
                " is out of range: this model has ",
                f"{self.num_classes} classes (0..{self.num_classes - 1}; -1 = the predicted class)",
            ]
        )
        return tf.where(bad, -1, class_index), tf.where(bad, message, "")

    @staticmethod
    def _some_row_valid(errors: tf.Tensor) -> tf.Operation:
        """Fail the call when every row is faulty, with each distinct fault named once."""
        faults = tf.unique(tf.boolean_mask(errors, tf.not_equal(errors, ""))).y
        return tf.debugging.Assert(
            tf.reduce_any(tf.equal(errors, "")), [tf.strings.reduce_join(faults, separator="; ")]
        )

    # --- signatures ---------------------------------------------------------------------------

    def signatures(self, default_method: str) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """predict, <method> for each method, <method>_fused with --target-layers, feature_maps, each
        also as _bytes; <name>_compact of each but feature_maps; serving_default."""
        height, width = self.image_size
        images_spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")
        bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
        class_spec = tf.TensorSpec([None], tf.int32, name="class_index")

        def from_images(images):
            return tf.cast(images, tf.float32), tf.fill(tf.shape(images)[:1], "")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def from_bytes(image_bytes):  # one decoder in the function library for every _bytes signature
            return decode_images(image_bytes, self.image_size, self.max_image_pixels)

        pixels_spec = tf.TensorSpec([None, height, width, 3], tf.float32)
        # Every part that signatures have in common is one function in the SavedModel's library, which
        # every signature's first Session::Run walks whole when it builds its executor: the backbone
        # (called by all but the guided signatures, whose forward pass runs through guided ReLUs), the
        # head with its backward pass, each method's numeric part, the request checks, the decoder and
        # the string outputs.
        self._backbone = tf.function(self._backbone, input_signature=[pixels_spec])
        head_specs = [tf.TensorSpec([None, *self.features.output.shape[1:]], tf.float32), class_spec]
        self._head_forward = tf.function(self._head_forward, input_signature=head_specs)
        self._head_backward = tf.function(self._head_backward, input_signature=head_specs)

        def core(compute, explains: bool) -> tuple[tf.types.experimental.GenericFunction, bool]:
            """(the numeric part of a signature, traced once for its images and its _bytes signature,
            whether it takes class_index)."""
            specs = [pixels_spec, class_spec] if explains else [pixels_spec]
            return tf.function(compute, input_signature=specs, jit_compile=self._jit_compile), explains

        def checked(to_pixels, spec, explains: bool):
            """The request's checks, its pixels and its per-row errors: one function for every signature
            that takes `spec` (and class_index). The model runs only once the call as a whole is valid."""
            def prepare(x, *class_index):
                x, class_index = self._checked_request(x, class_index[0] if explains else None)
                pixels, errors = to_pixels(x)
                arguments = [pixels]
                if explains:
                    class_index, class_errors = self._class_errors(class_index)
                    errors = tf.where(tf.equal(errors, ""), class_errors, errors)
                    arguments.append(class_index)
                with tf.control_dependencies([self._some_row_valid(errors)]):
                    return [tf.identity(a) for a in arguments], tf.identity(errors)

            return tf.function(prepare, input_signature=[spec, class_spec] if explains else [spec])

        present = tf.function(self._presented)  # one function per output structure
        # One PNG encoder in the library for the heatmap and Guided Grad-CAM's picture. A signature's
        # function runs whole, so a request that leaves the PNG out of its output_filter still pays
        # its encoding (~1 ms a 224x224 map on a CPU; docs/BENCHMARKS.md "Cold start" says why).
        pngs = tf.function(self._pngs, input_signature=[tf.TensorSpec([None, height, width, None], tf.uint8)])

        def signature(compute, prepare, spec, explains: bool, keep: list[str] | None = None):
            def run(x, *class_index):
                arguments, errors = prepare(x, *class_index)
                outputs = present(compute(*arguments), errors)
                if "heatmap_uint8" in outputs:
                    outputs["heatmap_png_bytes"] = pngs(outputs["heatmap_uint8"][..., tf.newaxis])
                if "guided" in outputs:  # Guided Grad-CAM's picture, 8-bit RGB
                    outputs["guided_png_bytes"] = pngs(guided_image(outputs["guided"]))
                return {name: outputs[name] for name in keep} if keep else outputs

            specs = [spec, class_spec] if explains else [spec]
            return tf.function(run, input_signature=specs).get_concrete_function()

        computations = {"predict": core(self._predict, explains=False)}
        for name, method in self.methods.items():
            computations[name] = core(lambda pixels, c, method=method: self.explain(method, pixels, c), explains=True)
        for name in self.fused_methods:
            computations[f"{name}_fused"] = core(
                lambda pixels, c, method=self.methods[name]: self._explain_fused(method, pixels, c), explains=True)
        if self.feature_maps:
            computations["feature_maps"] = core(self._feature_maps, explains=False)
        sigs, prepared = {}, {}
        for suffix, to_pixels, spec in (("", from_images, images_spec), ("_bytes", from_bytes, bytes_spec)):
            prepared[suffix] = {explains: checked(to_pixels, spec, explains) for explains in (False, True)}
            for name, (compute, explains) in computations.items():
                sigs[f"{name}{suffix}"] = signature(compute, prepared[suffix][explains], spec, explains)
        # The compact answer for REST, which cannot filter outputs: labels, scores and the PNG heatmap
        # of encoded images. The exporter makes each one share its _bytes signature's tensors (signature_defs.py).
        for name, (compute, explains) in computations.items():
            output_sets = default_output_sets(sigs[f"{name}_bytes"].structured_outputs)
            if output_sets:
                sigs[f"{name}{COMPACT}"] = signature(compute, prepared["_bytes"][explains], bytes_spec, explains,
                                                     output_sets[0])
        sigs["serving_default"] = sigs[f"{default_method}_bytes"]
        return sigs
