"""CAM methods: each one only says how to weight the target layer's channels.

A method maps the evidence of one batch (activations `A` [N,h,w,K], the gradient of the target
class's logit `dy_c/dA` [N,h,w,K], and for CAM the dense kernel column `w_c` [N,K]) to a raw map
[N,h,w]. The shared pipeline in `explainer.py` applies ReLU, normalisation and resize to all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What a method may use; `gradients` and `class_weights` are None when not needed."""

    activations: tf.Tensor  # A: [N, h, w, K]
    gradients: tf.Tensor | None  # dy_c/dA: [N, h, w, K]
    class_weights: tf.Tensor | None  # w_c: [N, K]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    saliency: Callable[[Evidence], tf.Tensor]  # -> raw map [N, h, w], before ReLU
    needs_gradient: bool = True
    needs_gap_dense_head: bool = False


def weighted_channel_sum(activations: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Σ_k w_k A_k per image: [N,h,w,K] x [N,K] -> [N,h,w]."""
    return tf.einsum("nhwk,nk->nhw", activations, weights)


def gradcam(e: Evidence) -> tf.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391, eq. 1-2).

    α_k = (1/Z) Σ_ij ∂y_c/∂A_k(i,j): the gradient averaged over space is the channel weight.
    """
    alpha = tf.reduce_mean(e.gradients, axis=(1, 2))
    return weighted_channel_sum(e.activations, alpha)


def cam(e: Evidence) -> tf.Tensor:
    """CAM (Zhou et al. 2016, arXiv 1512.04150, eq. 2): M_c = Σ_k w_{k,c} A_k.

    w is the kernel of the dense layer after global average pooling; no gradient needed.
    """
    return weighted_channel_sum(e.activations, e.class_weights)


def gradcam_plus_plus(e: Evidence) -> tf.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, arXiv 1710.11063, eq. 19 with an exponential score).

    α_k^ij = g² / (2g² + Σ_ab A_k(a,b) g³), w_k = Σ_ij α_k^ij ReLU(g_ij): pixel-wise weighting
    that lets several instances of a class all show up.
    """
    g = e.gradients
    g2 = tf.square(g)
    denominator = 2.0 * g2 + tf.reduce_sum(e.activations, axis=(1, 2), keepdims=True) * g2 * g
    alpha = tf.math.divide_no_nan(g2, denominator)
    weights = tf.reduce_sum(alpha * tf.nn.relu(g), axis=(1, 2))
    return weighted_channel_sum(e.activations, weights)


def hirescam(e: Evidence) -> tf.Tensor:
    """HiResCAM (Draelos & Carin 2020, arXiv 2011.08891): Σ_k ∂y_c/∂A_k ⊙ A_k.

    Element-wise product instead of pooled gradients: provably shows where the model looked.
    """
    return tf.reduce_sum(e.gradients * e.activations, axis=-1)


def layercam(e: Evidence) -> tf.Tensor:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30:5875): Σ_k ReLU(∂y_c/∂A_k) ⊙ A_k."""
    return tf.reduce_sum(tf.nn.relu(e.gradients) * e.activations, axis=-1)


def xgradcam(e: Evidence) -> tf.Tensor:
    """XGrad-CAM (Fu et al. 2020, arXiv 2008.02312, eq. 12): w_k = Σ_ij A_k(i,j) / Σ_ab A_k(a,b) · g_ij."""
    share = tf.math.divide_no_nan(e.activations, tf.reduce_sum(e.activations, axis=(1, 2), keepdims=True))
    weights = tf.reduce_sum(share * e.gradients, axis=(1, 2))
    return weighted_channel_sum(e.activations, weights)


def eigencam(e: Evidence) -> tf.Tensor:
    """EigenCAM (Muhammad & Yeasin 2020, arXiv 2008.00299): A projected on its first principal component.

    Class-agnostic and gradient-free. The sign of a principal component is arbitrary, so it is
    chosen to make the map correlate positively with the channel-summed activations.
    """
    n, h, w, k = tf.unstack(tf.shape(e.activations))
    flat = tf.reshape(e.activations, [n, h * w, k])
    centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
    _, _, v = tf.linalg.svd(centred, full_matrices=False)
    projection = tf.einsum("npk,nk->np", flat, v[:, :, 0])
    total = tf.reduce_sum(flat, axis=-1)
    covariance = tf.reduce_sum(
        (projection - tf.reduce_mean(projection, 1, keepdims=True)) * (total - tf.reduce_mean(total, 1, keepdims=True)),
        axis=1,
        keepdims=True,
    )
    sign = tf.where(covariance < 0, -1.0, 1.0)
    return tf.reshape(projection * sign, [n, h, w])


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gradcam", gradcam),
        Method("cam", cam, needs_gradient=False, needs_gap_dense_head=True),
        Method("gradcampp", gradcam_plus_plus),
        Method("hirescam", hirescam),
        Method("layercam", layercam),
        Method("xgradcam", xgradcam),
        Method("eigencam", eigencam, needs_gradient=False),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]
