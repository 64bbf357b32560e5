"""The serving signatures, assembled from the explainer's numeric cores, the request checks and the string outputs.

Every part that signatures have in common is one function in the SavedModel's library, which every
signature's first Session::Run walks whole when it builds its executor: the backbone (called by all
but the guided signatures, whose forward pass runs through guided ReLUs), the head with its backward
pass, each method's numeric core, the request checks, the decoder and the string outputs. So the
signatures run an explainer of their own, whose passes are those shared functions; the explainer
they are given keeps its own passes.
"""

from __future__ import annotations

import tensorflow as tf

from camserve.client.outputs import default_output_sets

from .decode import decode_images
from .explainer import Explainer, Passes
from .request_checks import InputContract
from .signature_defs import COMPACT
from .string_outputs import guided_image, pngs, presented

ConcreteFunction = tf.types.experimental.ConcreteFunction


def _shared_passes(explainer: Explainer, pixels_spec: tf.TensorSpec, class_spec: tf.TensorSpec) -> Passes:
    """The backbone's and the head's passes, each traced once into one function for every signature."""
    inline = Passes.inline(explainer.features, explainer.head, explainer.top_k_maps)
    head_specs = [tf.TensorSpec([None, *explainer.features.output.shape[1:]], tf.float32), class_spec]
    return Passes(
        backbone=tf.function(inline.backbone, input_signature=[pixels_spec]),
        head_forward=tf.function(inline.head_forward, input_signature=head_specs),
        head_backward=tf.function(inline.head_backward, input_signature=head_specs),
    )


def build_signatures(explainer: Explainer, labels: list[str], default_method: str) -> dict[str, ConcreteFunction]:
    """predict, <method> for each method, <method>_fused with --target-layers, <method>_smooth with
    --smooth, feature_maps, each also as _bytes; <name>_compact of each but feature_maps; serving_default
    (`<default_method>_bytes`). `labels`: the name of each class."""
    if len(labels) != explainer.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {explainer.num_classes} classes")
    options = explainer.options
    height, width = explainer.image_size
    images_spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")
    bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
    class_spec = tf.TensorSpec([None], tf.int32, name="class_index")
    pixels_spec = tf.TensorSpec([None, height, width, 3], tf.float32)
    explainer = explainer.with_passes(_shared_passes(explainer, pixels_spec, class_spec))
    contract = InputContract(explainer.image_size, options.max_batch_size, explainer.num_classes)
    class_names = tf.constant(labels)

    def from_images(images):
        return tf.cast(images, tf.float32), tf.fill(tf.shape(images)[:1], "")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def from_bytes(image_bytes):  # one decoder in the function library for every _bytes signature
        return decode_images(image_bytes, explainer.image_size, options.max_image_pixels)

    def core(compute, explains: bool) -> tuple[tf.types.experimental.GenericFunction, bool]:
        """(the numeric core of a signature, traced once for its images and its _bytes signature,
        whether it takes class_index)."""
        specs = [pixels_spec, class_spec] if explains else [pixels_spec]
        return tf.function(compute, input_signature=specs, jit_compile=options.jit_compile), explains

    def checked(to_pixels, spec, explains: bool):
        """The request's checks, its pixels and its per-row errors (InputContract.prepare): one function
        for every signature that takes `spec` (and class_index)."""
        def prepare(x, *class_index):
            return contract.prepare(x, class_index[0] if explains else None, to_pixels)

        return tf.function(prepare, input_signature=[spec, class_spec] if explains else [spec])

    @tf.function  # one function per output structure
    def present(outputs, errors):
        return presented(outputs, errors, class_names)

    # One PNG encoder in the library for the heatmap and Guided Grad-CAM's picture. A signature's
    # function runs whole, so a request that leaves the PNG out of its output_filter still pays
    # its encoding (~1 ms a 224x224 map on a CPU; docs/BENCHMARKS.md "Cold start" says why).
    encode_pngs = tf.function(pngs, input_signature=[tf.TensorSpec([None, height, width, None], tf.uint8)])

    def signature(compute, prepare, spec, explains: bool, keep: list[str] | None = None):
        def run(x, *class_index):
            arguments, errors = prepare(x, *class_index)
            outputs = present(compute(*arguments), errors)
            if "heatmap_uint8" in outputs:
                outputs["heatmap_png_bytes"] = encode_pngs(outputs["heatmap_uint8"][..., tf.newaxis])
            if "guided" in outputs:  # Guided Grad-CAM's picture, 8-bit RGB
                outputs["guided_png_bytes"] = encode_pngs(guided_image(outputs["guided"]))
            return {name: outputs[name] for name in keep} if keep else outputs

        specs = [spec, class_spec] if explains else [spec]
        return tf.function(run, input_signature=specs).get_concrete_function()

    computations = {"predict": core(explainer.predict, explains=False)}
    for name, method in explainer.methods.items():
        computations[name] = core(lambda pixels, c, method=method: explainer.explain(method, pixels, c), explains=True)
    if options.smooth:
        for name, method in explainer.methods.items():
            computations[f"{name}_smooth"] = core(
                lambda pixels, c, method=method: explainer.explain(method, pixels, c, options.smooth), explains=True)
    for name in explainer.fused_methods:
        computations[f"{name}_fused"] = core(
            lambda pixels, c, method=explainer.methods[name]: explainer.explain_fused(method, pixels, c), explains=True)
    if explainer.feature_maps:
        computations["feature_maps"] = core(explainer.most_activated_maps, explains=False)
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
