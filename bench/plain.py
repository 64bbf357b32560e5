"""The plain classifier export, what a user serves without us: the baseline of the start-up figures.

The same backbone and weights as ours (export/backbone.py), saved with Keras' `ExportArchive` with one
signature, `serving_default`: encoded images -> decoded, resized, preprocessed -> the model -> softmax
probabilities, and one warm-up record (one JPEG), so that TF Serving builds its one executor before it
says it is ready, as it does ours.
"""

from __future__ import annotations

import pathlib

import numpy as np


def export_plain(folder: pathlib.Path, backbone: str, weights: str) -> pathlib.Path:
    """Save the plain classifier as `folder`/1 (a model's base path: `folder`); returns the version's folder."""
    import keras
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from camserve.client import protos
    from camserve.export.backbone import load_model
    from camserve.serving.servables.warmup import write_warmup_requests

    model, preprocess = load_model(backbone, weights, None)
    preprocess = preprocess or (lambda x: x)
    height, width = model.input_shape[1:3]

    def serve(image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return tf.image.resize(tf.cast(image, tf.float32), (height, width))

        pixels = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        return {"probabilities": tf.nn.softmax(model(preprocess(pixels), training=False))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    version = pathlib.Path(folder, "1")
    archive.write_out(str(version), verbose=False)
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    request = protos.predict_request(protos.ModelSpec(signature_name="serving_default"),
                                     image_bytes=[tf.io.encode_jpeg(image).numpy()])
    write_warmup_requests(version, [predict_pb2.PredictRequest.FromString(request.SerializeToString())])
    return version
