"""Decode encoded images inside the graph, refusing oversized ones before decoding.

A refused or undecodable image fails only its own row: it is replaced by zeros and the row's
error message says why (see `decode_images`).

A valid 250 KB PNG can declare 16000x16000 pixels and make the decoder allocate 768 MB, so the
size written in the header is checked first (JPEG via `extract_jpeg_shape`, PNG/BMP by reading
their fixed header fields) and only then is the image decoded.

GIF is refused: TF's GIF decoder reads every frame and sizes its canvas by the largest frame, not
by the size in the header, so a 190 KB GIF whose header says 64x64 can hold a 16000x16000 frame
(27 s of CPU and 256 MB to decode it), and finding every frame's size means walking the file's
block chain, which graph ops do far too slowly. Grayscale, 16-bit and alpha PNGs are decoded to
8-bit RGB (alpha dropped), as are grayscale JPEGs and BMPs.

The thin client reads the same headers without TensorFlow (client/image_header.py), so that its explain
page refuses what the graph would; tests/test_shared_facts.py feeds both the same files.
"""

from __future__ import annotations

import tensorflow as tf

from camserve.client.image_header import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS  # the explain page's default too

HEADER_BYTES = 32


def _uint(b: tf.Tensor, offsets: list[int]) -> tf.Tensor:
    """Unsigned integer from header bytes, most significant first."""
    value = tf.constant(0, tf.int64)
    for offset in offsets:
        value = value * 256 + b[offset]
    return value


def _int32(value: tf.Tensor) -> tf.Tensor:
    """The signed 32-bit integer whose bits `value` holds."""
    return tf.where(value >= 2**31, value - 2**32, value)


def declared_size(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(known_format, is_gif, height, width) as written in the image header, without decoding pixels."""
    head = tf.strings.substr(tf.strings.join([data, b"\0" * HEADER_BYTES]), 0, HEADER_BYTES)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
    is_png = tf.reduce_all(tf.equal(b[:8], [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]))
    is_jpeg = tf.reduce_all(tf.equal(b[:3], [0xFF, 0xD8, 0xFF]))
    is_gif = tf.reduce_all(tf.equal(b[:3], [0x47, 0x49, 0x46]))
    is_bmp = tf.reduce_all(tf.equal(b[:2], [0x42, 0x4D]))
    length = tf.strings.length(data)

    def size(height: tf.Tensor, width: tf.Tensor, end: int) -> tuple[tf.Tensor, tf.Tensor]:
        """The size fields, or 0x0 where the file ends before byte `end` (its decoder refuses it)."""
        return tf.where(length >= end, height, 0), tf.where(length >= end, width, 0)

    def jpeg():  # libjpeg refuses a header that ends before the first scan
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[0], shape[1]

    def png():
        return size(_uint(b, [20, 21, 22, 23]), _uint(b, [16, 17, 18, 19]), 24)

    def gif():
        return size(_uint(b, [9, 8]), _uint(b, [7, 6]), 10)

    def bmp():  # little-endian signed 32-bit; a negative height means top-down rows, a negative width is corrupt
        width = _int32(_uint(b, [21, 20, 19, 18]))
        height = _int32(_uint(b, [25, 24, 23, 22]))
        return size(tf.abs(height), width, 26)

    def unknown():
        return tf.constant(0, tf.int64), tf.constant(0, tf.int64)

    height, width = tf.case(
        [(is_jpeg, jpeg), (is_png, png), (is_gif, gif), (is_bmp, bmp)], default=unknown, exclusive=False
    )
    known = is_jpeg | is_png | is_gif | is_bmp
    return known, is_gif, height, width


def header_error(data: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """Why one encoded image is refused before decoding, from its header alone; "" if it is not."""
    known, is_gif, height, width = declared_size(data)
    too_large = tf.strings.format(
        "image_bytes: the image declares {}x{} pixels, more than the limit of {} pixels", (width, height, max_pixels)
    )
    refusals = [  # the first that applies is reported
        (tf.equal(tf.strings.length(data), 0), "image_bytes: an image is empty (0 bytes)"),
        (tf.logical_not(known), "image_bytes: not a JPEG, PNG or BMP image (unknown file signature)"),
        (is_gif, "image_bytes: GIF images are not accepted (their frames may be far larger than the header "
                 "says): send PNG or JPEG"),
        # in float64: two 32-bit sizes can overflow int64 (2^32-1 squared); limits below 2^53 compare exactly
        (tf.cast(height, tf.float64) * tf.cast(width, tf.float64) > max_pixels, too_large),
    ]
    message = tf.constant("")
    for refused, text in reversed(refusals):
        message = tf.where(refused, text, message)
    return message


def _decode(data: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image = tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32)
    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
    return tf.cond(
        same_size,
        lambda: image,
        lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
    )


def decode_image(data: tf.Tensor, size: tuple[int, int], max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """One encoded image -> (float32 [H, W, 3] RGB 0..255 at the model size, error).

    A refused image is not decoded: it becomes zeros and `error` says why ("" otherwise).
    """
    error = header_error(data, max_pixels)
    image = tf.cond(
        tf.equal(error, ""), lambda: _decode(data, size), lambda: tf.zeros([*size, 3], tf.float32)
    )
    return image, error


UNDECODABLE = "image_bytes: the image cannot be decoded (corrupt or truncated?)"


def decode_images(image_bytes: tf.Tensor, size: tuple[int, int], max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of encoded images [N] -> (float32 [N, H, W, 3], errors [N]).

    A graph has no try/except, and a decoder that fails on corrupt data fails the whole call, so
    every image that a batching server put beside it too. tf.data's `ignore_errors` is the one
    graph construct that drops a failing element and carries on: the images are decoded as a
    dataset of (row, image, error), and a row missing from its output could not be decoded.
    """
    n = tf.shape(image_bytes, out_type=tf.int64)[0]

    def one(row, data):
        image, error = decode_image(data, size, max_pixels)
        return row, image, error

    decoded = (
        tf.data.Dataset.from_tensor_slices((tf.range(n), image_bytes))
        .map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
    )
    # A first element that always exists, so that the batch exists when every image fails.
    anchor = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.zeros([*size, 3]), tf.constant("")))
    rows, images, errors = anchor.concatenate(decoded).batch(n + 1).get_single_element()
    rows = rows[1:, tf.newaxis]
    images = tf.scatter_nd(rows, images[1:], tf.stack([n, *size, 3]))
    errors = tf.scatter_nd(rows, errors[1:], [n])
    decoded_rows = tf.scatter_nd(rows, tf.ones_like(rows[:, 0], tf.bool), [n])
    return images, tf.where(decoded_rows, errors, UNDECODABLE)
