"""The warm-up requests of a version: the executors our callers use by default, built before the server
says it is ready (TF Serving replays `assets.extra/tf_serving_warmup_requests`: serving/servables/warmup.py).

TF Serving's session builds one executor per set of fed and fetched tensors, with Grappler over the
graph (about a second each on a CPU: docs/BENCHMARKS.md "Start-up and export"). The client, the CLI and
the page make every call on `explain_bytes` with one output set (client/outputs.py), the predictions
included (method `predict`), and those of --smooth and --target-layers on
`explain_smooth_bytes` and `explain_fused_bytes`. So the warm-up sends each of these families:
- a row of each of its methods (and a prediction), then a prediction alone (explain_bytes), so that
  every branch of the graph has run once before a real call: the first run of a kernel sets it up
  (oneDNN's primitives, cuDNN's algorithm choice). All but those whose row is a whole call's worth of
  forward passes (`Method.warmed`: Score-CAM), where that set-up is a small part of the first call;
- then each batch size of `batch_sizes`, every row the first method (shape-dependent work: XLA's
  compilations).
Nothing else: the views (a method's own signatures, predict, feature_maps), the `images` inputs and
any other output set pay their executor build at their first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from camserve.client.outputs import (
    EXPLAIN_BYTES,
    EXPLAIN_SIGNATURE,
    METHOD_INPUT,
    PREDICT,
    VARIANT_SUFFIXES,
    default_outputs,
)

if TYPE_CHECKING:
    from tensorflow_serving.apis import predict_pb2


def request_maker(image_size: tuple[int, int]) -> Callable[..., "predict_pb2.PredictRequest"]:
    """A function (signature name, signature, each row's method, outputs) -> PredictRequest on plausible
    inputs: the same noise image (as uint8 pixels or a JPEG) and class -1 in every row."""
    from tensorflow_serving.apis import predict_pb2

    from camserve.client import protos

    image = np.random.default_rng(0).integers(0, 256, size=(*image_size, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image).numpy()

    def make(name: str, signature, methods: Sequence[str], outputs: Sequence[str] = ()) -> predict_pb2.PredictRequest:
        inputs = {spec.name for spec in tf.nest.flatten(signature.structured_input_signature)}
        batch = len(methods)
        request = protos.predict_request(
            protos.ModelSpec(signature_name=name),
            images=np.stack([image] * batch) if "images" in inputs else None,
            image_bytes=[jpeg] * batch if "image_bytes" in inputs else None,
            class_index=np.full(batch, -1, np.int32) if "class_index" in inputs else None,
            method=methods if METHOD_INPUT in inputs else None,
            output_filter=outputs,
        )
        return predict_pb2.PredictRequest.FromString(request.SerializeToString())

    return make


def warmup_requests(families: Mapping[str, tf.types.experimental.ConcreteFunction], methods: Sequence[str],
                    fused: Sequence[str], image_size: tuple[int, int], batch_sizes: Sequence[int],
                    ) -> list["predict_pb2.PredictRequest"]:
    """The requests of the module docstring; `methods`: the warmed ones in the explain family's order,
    the default first; `fused`: the fused family's."""
    make = request_maker(image_size)
    warmed = {EXPLAIN_BYTES: [*methods, PREDICT]}
    for suffix in VARIANT_SUFFIXES:
        name = f"{EXPLAIN_SIGNATURE}{suffix}_bytes"
        if name in families:
            warmed[name] = list(fused if suffix == "_fused" else methods) or [PREDICT]

    def request(name: str, rows: Sequence[str]) -> predict_pb2.PredictRequest:
        return make(name, families[name], rows, default_outputs(families[name].structured_outputs) or ())

    first = [request(name, rows) for name, rows in warmed.items()] + [request(EXPLAIN_BYTES, [PREDICT])]
    return first + [request(name, [rows[0]] * batch) for batch in batch_sizes for name, rows in warmed.items()]
