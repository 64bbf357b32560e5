"""The two smoothings of pytorch-grad-cam, in the graph: `<method>_smooth` signatures (--smooth).

- eigen: the raw map is the first principal component of the weighted activations w_k A_k instead of
  their sum over channels (pytorch-grad-cam's eigen_smooth: centred, projected on the first right
  singular vector), with the sign that makes it correlate positively with the sum.
- aug: test-time augmentation. The method runs on four views of each image: the image, its mirror
  image, and both zoomed in by AUG_ZOOM about the centre (the central 80 %, resized to the input
  size). Each view's map is mapped back to the image's frame and the maps are averaged where each
  view saw the image (the border outside the zoomed views: the two unzoomed maps).
"""

from __future__ import annotations

import tensorflow as tf

from .methods import principal_direction

SMOOTHINGS = {
    "aug": "average over the image, its mirror image and both zoomed in 1.25x (4 passes)",
    "eigen": "first principal component of the weighted activations instead of their sum",
}
AUG_ZOOM = 1.25
AUG_VIEWS = 4  # image, mirror, zoomed, zoomed mirror: augmented_views' order


def eigen_projection(weighted: tf.Tensor) -> tf.Tensor:
    """The raw map [N,h,w] of weighted activations [N,h,w,K]: their projection on the first principal
    direction, centred over the positions."""
    n, h, w, k = tf.unstack(tf.shape(weighted))
    flat = tf.reshape(weighted, [n, h * w, k])
    direction = principal_direction(flat, tf.reduce_sum(flat, axis=-1))
    centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
    return tf.reshape(tf.einsum("npk,nk->np", centred, direction), [n, h, w])


def _zoomed_size(size: tuple[int, int]) -> tuple[int, int]:
    return round(size[0] * AUG_ZOOM), round(size[1] * AUG_ZOOM)


def _mirror(images: tf.Tensor) -> tf.Tensor:
    return tf.reverse(images, axis=[2])


def augmented_views(pixels: tf.Tensor) -> tf.Tensor:
    """[N,H,W,3] -> the AUG_VIEWS views [4N,H,W,3], view by view: pixels, mirrored, zoomed, zoomed mirrored."""
    height, width = pixels.shape[1:3]
    big_height, big_width = _zoomed_size((height, width))
    top, left = (big_height - height) // 2, (big_width - width) // 2
    zoomed = tf.image.resize(pixels, (big_height, big_width), method="bilinear")[:, top : top + height,
                                                                                 left : left + width]
    return tf.concat([pixels, _mirror(pixels), zoomed, _mirror(zoomed)], axis=0)


def _unzoom(maps: tf.Tensor) -> tf.Tensor:
    """Maps [N,H,W,1] of zoomed views back in the image's frame (zero where the view did not see it)."""
    height, width = maps.shape[1:3]
    big_height, big_width = _zoomed_size((height, width))
    top, left = (big_height - height) // 2, (big_width - width) // 2
    padded = tf.pad(maps, [[0, 0], [top, big_height - height - top], [left, big_width - width - left], [0, 0]])
    return tf.image.resize(padded, (height, width), method="bilinear")


def merge_views(maps: tf.Tensor) -> tf.Tensor:
    """The maps [4N,H,W] of augmented_views' views -> their average [N,H,W] in the image's frame,
    each pixel over the views that saw it."""
    image, mirrored, zoomed, zoomed_mirrored = tf.split(maps[..., tf.newaxis], AUG_VIEWS, axis=0)
    total = image + _mirror(mirrored) + _unzoom(zoomed) + _unzoom(_mirror(zoomed_mirrored))
    coverage = 2.0 + 2.0 * _unzoom(tf.ones_like(zoomed))
    return (total / coverage)[..., 0]
