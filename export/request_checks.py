"""The input contract, checked in the graph outside any XLA cluster, so that it always runs.

TF Serving feeds whatever a request holds: it checks neither shapes nor batch sizes against the
signature, so the graph checks its own contract. A fault of the request as a whole (shape, batch
size, class_index or method length) fails the call with INVALID_ARGUMENT. A fault of one image
(refused from its header or undecodable: decode.py; class out of range; a method the model lacks)
only marks its row in the `error` output, and the row is computed on a stand-in (zeros, the
predicted class, the first method): with TF Serving's batching, one caller's bad image must not
fail the callers batched with it. A call whose rows are all faulty fails
with INVALID_ARGUMENT, so a lone bad request still gets a plain error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class InputContract:
    image_size: tuple[int, int]  # (height, width) of the `images` input
    max_batch_size: int
    num_classes: int
    methods: tuple[str, ...] = ()  # the names a `method` input may take, in the order of their indices

    def prepare(self, x: tf.Tensor, to_pixels: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
                class_index: tf.Tensor, method: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        """([pixels, class_index, each row's method as its index in `methods`], the error of each row):
        the request checked, `x` made pixels with per-row errors by `to_pixels` (a cast, or the decoder),
        faulty classes replaced by -1, unknown methods by the first. The model runs only once the call
        as a whole is valid."""
        x, class_index, method = self.checked_request(x, class_index, method)
        pixels, errors = to_pixels(x)
        arguments = [pixels]
        for given, check in ((class_index, self.class_errors), (method, self.method_indices)):
            value, row_errors = check(given)
            errors = tf.where(tf.equal(errors, ""), row_errors, errors)
            arguments.append(value)
        with tf.control_dependencies([some_row_valid(errors)]):
            return [tf.identity(a) for a in arguments], tf.identity(errors)

    def checked_request(self, x: tf.Tensor, class_index: tf.Tensor, method: tf.Tensor,
                        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`x`, `class_index` and `method` in their declared shapes, once the request as a whole is valid."""
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
        per_image = {"class_index": class_index, "method": method}
        for name, value in per_image.items():
            checks.append(tf.debugging.Assert(tf.equal(tf.size(value), batch), [tf.strings.format(
                f"{name} needs one entry per image: {{}} images, {name} of shape {{}}", (batch, tf.shape(value)))]))
        with tf.control_dependencies(checks):
            return tf.identity(x), tf.reshape(class_index, [-1]), tf.reshape(method, [-1])

    def class_errors(self, class_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
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

    def method_indices(self, method: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(each row's method as its index in `methods`, 0 where the model has no such method; per-row
        error message or "")."""
        matches = tf.equal(method[:, tf.newaxis], tf.constant(self.methods)[tf.newaxis])
        indices = tf.argmax(tf.cast(matches, tf.int32), axis=1, output_type=tf.int32)
        message = tf.strings.join(["method '", method, f"' is not one of this model's: {', '.join(self.methods)}"])
        return indices, tf.where(tf.reduce_any(matches, axis=1), "", message)


def some_row_valid(errors: tf.Tensor) -> tf.Operation:
    """Fail the call when every row is faulty, with each distinct fault named once."""
    faults = tf.unique(tf.boolean_mask(errors, tf.not_equal(errors, ""))).y
    return tf.debugging.Assert(tf.reduce_any(tf.equal(errors, "")), [tf.strings.reduce_join(faults, separator="; ")])
