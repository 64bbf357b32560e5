"""The signatures the exporter traces: three families, each one function for every method.

- `explain`, `explain_bytes`: uint8 images or encoded images, `class_index` and `method`, one per row:
  any method of the model, or `predict` for the prediction alone; with `--feature-maps` also the target
  layer's most activated channels. The client, the CLI and the page call these.
- `explain_smooth`, `explain_smooth_bytes` (--smooth): the maps smoothed.
- `explain_fused`, `explain_fused_bytes` (--target-layers): the fused maps of the methods that fuse.

One function serves every method of a family, so TF Serving builds one executor for all of them, and
the SavedModel's function library stays small: every function in it costs the load and each executor
build (docs/BENCHMARKS.md "Start-up and export"). Every other signature (a method's own, predict,
feature_maps, the compact answers, serving_default) runs a family's function with inputs fixed, written
into the saved graph without a function of its own (signature_defs.py).

Every part that the families have in common is one function: the backbone, the head with and without
its backward pass, the request checks, the decoder and the string outputs. So the signatures run an
explainer of their own, whose passes are those shared functions; the explainer they are given keeps
its own passes.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from camserve.client.outputs import EXPLAIN_SIGNATURE, METHOD_INPUT, PREDICT

from .decode import decode_images
from .explainer import Explainer, Passes, eight_bit
from .methods import Method
from .request_checks import InputContract
from .string_outputs import guided_image, pngs, pngs_of_rows, presented

ConcreteFunction = tf.types.experimental.ConcreteFunction
# A numeric core: (pixels [N,H,W,3] float32, class_index [N], each row's method index [N]) -> outputs.
Core = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]


def _shared_passes(explainer: Explainer, pixels_spec: tf.TensorSpec, class_spec: tf.TensorSpec,
                   jit_compile: bool) -> Passes:
    """The backbone's and the head's passes, each traced once into one function for every signature
    (with --jit-compile, each one compiled by XLA)."""
    inline = Passes.inline(explainer.features, explainer.head, explainer.top_k_maps)
    head_specs = [tf.TensorSpec([None, *explainer.features.output.shape[1:]], tf.float32), class_spec]
    return Passes(
        backbone=tf.function(inline.backbone, input_signature=[pixels_spec], jit_compile=jit_compile),
        head_forward=tf.function(inline.head_forward, input_signature=head_specs, jit_compile=jit_compile),
        head_backward=tf.function(inline.head_backward, input_signature=head_specs, jit_compile=jit_compile),
    )


def build_signatures(explainer: Explainer, labels: list[str], *, max_batch_size: int, max_image_pixels: int,
                     smooth: tuple[str, ...] = (), jit_compile: bool = False) -> dict[str, ConcreteFunction]:
    """The families of the module docstring, by name. `labels`: the name of each class. With `jit_compile`,
    XLA compiles every numeric core (the explainer then runs each row's method in a loop over the rows:
    Explainer._by_method)."""
    if len(labels) != explainer.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {explainer.num_classes} classes")
    height, width = explainer.image_size
    images_spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")
    bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
    class_spec = tf.TensorSpec([None], tf.int32, name="class_index")
    method_spec = tf.TensorSpec([None], tf.string, name=METHOD_INPUT)
    pixels_spec = tf.TensorSpec([None, height, width, 3], tf.float32)
    ids_spec = tf.TensorSpec([None], tf.int32)
    explainer = explainer.with_passes(_shared_passes(explainer, pixels_spec, class_spec, jit_compile), jit_compile)
    class_names = tf.constant(labels)

    def from_images(images):
        return tf.cast(images, tf.float32), tf.fill(tf.shape(images)[:1], "")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def from_bytes(image_bytes):  # one decoder in the function library for every _bytes signature
        return decode_images(image_bytes, explainer.image_size, max_image_pixels)

    @tf.function  # one function per output structure
    def present(outputs, errors):
        return presented(outputs, errors, class_names)

    # One PNG encoder in the library for the heatmap and Guided Grad-CAM's picture. A signature's
    # function runs whole, so a request that leaves the PNG out of its output_filter still pays
    # its encoding (~1 ms a 224x224 map on a CPU; docs/BENCHMARKS.md "Cold start" says why).
    encode_pngs = tf.function(pngs, input_signature=[tf.TensorSpec([None, height, width, None], tf.uint8)])
    encoders = {"heatmap": lambda heatmaps: encode_pngs(eight_bit(heatmaps)[..., tf.newaxis]),  # 8-bit grey
                "guided": lambda guided: encode_pngs(guided_image(guided))}  # 8-bit RGB

    def family(core: Core, methods: list[Method], to_pixels, spec: tf.TensorSpec) -> ConcreteFunction:
        """A family's whole computation on (images or image_bytes, class_index, method): the request's
        checks (InputContract.prepare), `core` (each row's method as its index in `methods`, or
        len(methods): the prediction alone), the names, and the pictures as PNG, "" in the rows that have
        none (the prediction alone; Guided Grad-CAM's picture in the rows of the other methods)."""
        contract = InputContract(explainer.image_size, max_batch_size, explainer.num_classes,
                                 (*(m.name for m in methods), PREDICT))
        guided = tf.constant([m.guided for m in methods] + [False])

        def run(x, class_index, method):
            (pixels, class_index, ids), errors = contract.prepare(x, to_pixels, class_index, method)
            outputs = present(core(pixels, class_index, ids), errors)
            has_one = {"heatmap": tf.not_equal(ids, len(methods)), "guided": tf.gather(guided, ids)}
            for picture, encode in encoders.items():
                if picture in outputs:
                    outputs[f"{picture}_png_bytes"] = pngs_of_rows(outputs[picture], has_one[picture], encode)
            return outputs

        return tf.function(run, input_signature=[spec, class_spec, method_spec]).get_concrete_function()

    def numeric(function) -> Core:
        return tf.function(function, input_signature=[pixels_spec, class_spec, ids_spec], jit_compile=jit_compile)

    methods = list(explainer.methods.values())
    cores = {EXPLAIN_SIGNATURE: (numeric(explainer.explain), methods)}
    if smooth:
        smoothed = numeric(lambda p, c, ids: explainer.explain(p, c, ids, smooth))
        cores[f"{EXPLAIN_SIGNATURE}_smooth"] = (smoothed, methods)
    if explainer.fused_methods:
        cores[f"{EXPLAIN_SIGNATURE}_fused"] = (numeric(explainer.explain_fused),
                                               [explainer.methods[name] for name in explainer.fused_methods])
    return {f"{name}{suffix}": family(core, family_methods, to_pixels, spec)
            for name, (core, family_methods) in cores.items()
            for suffix, to_pixels, spec in (("", from_images, images_spec), ("_bytes", from_bytes, bytes_spec))}
