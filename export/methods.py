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


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gradcam", gradcam),
        Method("cam", cam, needs_gradient=False, needs_gap_dense_head=True),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]
