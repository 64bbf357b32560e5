"""The string outputs, added around the numeric core outside any XLA cluster (XLA has no strings):
class names, the per-row `error`, and the heatmap and Guided Grad-CAM's picture as PNG."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

PNG_COMPRESSION = 2  # zlib level of the PNG outputs (see `pngs`)


def presented(outputs: dict[str, tf.Tensor], errors: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
    """A numeric core's outputs with the errors of its rows and, where it predicts, the names of its classes."""
    outputs = {**outputs, "error": errors}
    if "class_index" in outputs:
        outputs["class_label"] = tf.gather(labels, outputs["class_index"])
        outputs["top_k_labels"] = tf.gather(labels, outputs["top_k_indices"])
    return outputs


def pngs(images: tf.Tensor) -> tf.Tensor:
    """uint8 images [N,H,W,C] (C = 1: the heatmaps; 3: Guided Grad-CAM's pictures) as PNGs [N].

    Compact on any server: TF Serving sends uint8 tensors as one varint per value (~100 KB for a
    224x224 map); a PNG string travels as its bytes (~5-25 KB). The outputs' names end in "_bytes"
    because TF Serving's REST API writes a string output as {"b64": ...} only then
    (util/json_tensor.cc); any other string goes out raw, which PNG bytes cannot. zlib level 2: a
    quarter of the default level's time (0.9 vs 3.8 ms a 224x224 map in the graph, one CPU core), ~15 % larger.
    """
    return tf.map_fn(lambda image: tf.io.encode_png(image, compression=PNG_COMPRESSION), images,
                     fn_output_signature=tf.string)


def pngs_of_rows(values: tf.Tensor, rows: tf.Tensor, encode: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """`encode` (values [n, ...] -> PNGs [n]) of the rows where `rows` [N] is true, "" in the others. The
    rows are taken from the values before they become pictures: a float gather has a GPU kernel, a uint8 one not."""
    chosen = tf.where(rows)
    return tf.tensor_scatter_nd_update(tf.fill(tf.shape(rows), ""), chosen, encode(tf.gather(values, chosen[:, 0])))


def guided_image(guided: tf.Tensor) -> tf.Tensor:
    """The usual picture of a gradient image [N,H,W,3] as uint8: each image standardised, scaled
    to a standard deviation of 0.1 around grey (0.5), clipped."""
    mean, variance = tf.nn.moments(guided, axes=(1, 2, 3), keepdims=True)
    picture = (guided - mean) / (tf.sqrt(variance) + 1e-5) * 0.1 + 0.5
    return tf.cast(tf.round(tf.clip_by_value(picture, 0.0, 1.0) * 255.0), tf.uint8)
