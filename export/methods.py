"""CAM methods: each one only says how to weight the target layer's channels.

A method maps the evidence of one batch (activations `A` [N,h,w,K], the gradient of the target
class's logit `dy_c/dA` [N,h,w,K], and for CAM the dense kernel column `w_c` [N,K]) to weights: one
per channel [N,K], or one per activation [N,h,w,K] (HiResCAM, LayerCAM). Score-CAM and Ablation-CAM
find their weights by running the model again on changed inputs or activations, so the evidence also
carries the model's two halves. The shared pipeline in `explainer.py` weights A, sums the channels
(or, with --smooth eigen, takes their first principal component: export/smoothing.py), then applies
ReLU, normalisation and resize to all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What a method may use; `gradients` and `class_weights` are None when not needed."""

    activations: tf.Tensor  # A: [N, h, w, K] (a token layer's patch tokens laid out as their grid)
    gradients: tf.Tensor | None  # dy_c/dA: [N, h, w, K]
    class_weights: tf.Tensor | None  # w_c: [N, K]
    targets: tf.Tensor | None = None  # c: [N], the class each row explains
    scores: tf.Tensor | None = None  # y_c: [N], each row's class logit (the head's output, already computed)
    inputs: tf.Tensor | None = None  # the model's input x (preprocessed): [N, H, W, 3]
    features: Callable[[tf.Tensor], tf.Tensor] | None = None  # x -> A
    head: Callable[[tf.Tensor], tf.Tensor] | None = None  # the target layer's output -> logits
    layer_output: tf.Tensor | None = None  # the target layer's output as the head takes it: A, or its tokens [N, T, K]
    channels: int = 0  # how many of the most activated channels Score-/Ablation-CAM score; 0: all


@dataclasses.dataclass(frozen=True)
class ChannelLimit:
    """A method that runs the model once per channel scores only the most activated ones: how many by
    default (0: all), and the help of its export flag `--<method>-channels` (export/options.py)."""

    default: int
    help: str


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    weights: Callable[[Evidence], tf.Tensor]  # -> channel weights [N, K] or element-wise weights [N, h, w, K]
    needs_gradient: bool = True
    needs_gap_dense_head: bool = False
    guided: bool = False  # also returns guided backpropagation times the map (Guided Grad-CAM)
    fusable: bool = True  # uses A and dy_c/dA only, so it can be fused over several layers
    channel_limit: ChannelLimit | None = None  # scores channels one by one: Evidence.channels comes from it
    warmed: bool = True  # has a row in the warm-up; export/warmup.py says why Score-CAM has none


def weighted_activations(activations: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """w_k A_k: [N,h,w,K] times channel weights [N,K] or element-wise weights [N,h,w,K]."""
    if weights.shape.rank == 2:
        weights = weights[:, tf.newaxis, tf.newaxis, :]
    return activations * weights


def channel_sum(weighted: tf.Tensor) -> tf.Tensor:
    """The raw map Σ_k w_k A_k [N,h,w] of weighted activations [N,h,w,K]."""
    return tf.reduce_sum(weighted, axis=-1)


def _spread(weights: tf.Tensor, chosen: tf.Tensor, channels: int) -> tf.Tensor:
    """Weights [N,M] of the chosen channels [N,M] as weights [N,K] of every channel (0 for the others)."""
    return tf.einsum("nm,nmk->nk", weights, tf.one_hot(chosen, channels, dtype=weights.dtype))


def gradcam(e: Evidence) -> tf.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391, eq. 1-2).

    α_k = (1/Z) Σ_ij ∂y_c/∂A_k(i,j): the gradient averaged over space is the channel weight.
    """
    return tf.reduce_mean(e.gradients, axis=(1, 2))


def cam(e: Evidence) -> tf.Tensor:
    """CAM (Zhou et al. 2016, arXiv 1512.04150, eq. 2): M_c = Σ_k w_{k,c} A_k.

    w is the kernel of the dense layer after global average pooling; no gradient needed.
    """
    return e.class_weights


def gradcam_plus_plus(e: Evidence) -> tf.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, arXiv 1710.11063, eq. 19 with an exponential score).

    α_k^ij = g² / (2g² + Σ_ab A_k(a,b) g³), w_k = Σ_ij α_k^ij ReLU(g_ij): pixel-wise weighting
    that lets several instances of a class all show up.
    """
    g = e.gradients
    g2 = tf.square(g)
    denominator = 2.0 * g2 + tf.reduce_sum(e.activations, axis=(1, 2), keepdims=True) * g2 * g
    alpha = tf.math.divide_no_nan(g2, denominator)
    return tf.reduce_sum(alpha * tf.nn.relu(g), axis=(1, 2))


def hirescam(e: Evidence) -> tf.Tensor:
    """HiResCAM (Draelos & Carin 2020, arXiv 2011.08891): Σ_k ∂y_c/∂A_k ⊙ A_k.

    Element-wise product instead of pooled gradients: provably shows where the model looked.
    """
    return e.gradients


def layercam(e: Evidence) -> tf.Tensor:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30:5875): Σ_k ReLU(∂y_c/∂A_k) ⊙ A_k."""
    return tf.nn.relu(e.gradients)


def xgradcam(e: Evidence) -> tf.Tensor:
    """XGrad-CAM (Fu et al. 2020, arXiv 2008.02312, eq. 12): w_k = Σ_ij A_k(i,j) / Σ_ab A_k(a,b) · g_ij."""
    share = tf.math.divide_no_nan(e.activations, tf.reduce_sum(e.activations, axis=(1, 2), keepdims=True))
    return tf.reduce_sum(share * e.gradients, axis=(1, 2))


def principal_direction(values: tf.Tensor, reference: tf.Tensor) -> tf.Tensor:
    """The first principal direction v [N,K] of `values` [N,P,K] (K channels at P positions, centred over
    the positions). Its sign is arbitrary, so it is chosen to make the projection correlate positively
    with `reference` [N,P]."""
    centred = values - tf.reduce_mean(values, axis=1, keepdims=True)
    _, _, v = tf.linalg.svd(centred, full_matrices=False)
    v = v[:, :, 0]
    projection = tf.einsum("npk,nk->np", centred, v)
    covariance = tf.reduce_sum(projection * (reference - tf.reduce_mean(reference, 1, keepdims=True)), 1, keepdims=True)
    return v * tf.where(covariance < 0, -1.0, 1.0)


def eigencam(e: Evidence) -> tf.Tensor:
    """EigenCAM (Muhammad & Yeasin 2020, arXiv 2008.00299): A projected on its first principal component.

    Class-agnostic and gradient-free: the weights are the direction itself, with the sign that makes
    the map correlate positively with the channel-summed activations.
    """
    n, h, w, k = tf.unstack(tf.shape(e.activations))
    flat = tf.reshape(e.activations, [n, h * w, k])
    return principal_direction(flat, tf.reduce_sum(flat, axis=-1))


def top_channels(activations: tf.Tensor, count: int) -> tf.Tensor:
    """Indices [N, M] of the `count` channels with the largest mean activation (all when count is 0)."""
    channels = int(activations.shape[-1])
    count = channels if count <= 0 else min(count, channels)
    return tf.math.top_k(tf.reduce_mean(activations, axis=(1, 2)), k=count).indices


def scorecam(e: Evidence) -> tf.Tensor:
    """Score-CAM (Wang et al. 2020, arXiv 1910.01279, eq. 5-8): each channel weighted by how much
    the input, masked by that channel, alone raises the class score.

    The variant of the authors' code and pytorch-grad-cam: a mask is channel k of A upsampled
    (bilinear) to the input size and min-max normalised to [0, 1]; it multiplies the model's input x
    (after preprocessing, so a masked-out pixel is 0 there, the mean colour for mean-subtracted
    models); the score is the class logit y_c(x ⊙ H_k); the weights are the softmax over channels
    of the scores, which equals the softmax of the increases over any baseline. Only the
    `channels` most activated channels are scored (the rest weigh 0): M forward passes per image,
    run as one batch of M masked images per image.
    """
    chosen = top_channels(e.activations, e.channels)  # [N, M]
    selected = tf.gather(e.activations, chosen, axis=3, batch_dims=1)  # [N, h, w, M]
    masks = tf.image.resize(selected, e.inputs.shape[1:3], method="bilinear")  # [N, H, W, M]
    low = tf.reduce_min(masks, axis=(1, 2), keepdims=True)
    high = tf.reduce_max(masks, axis=(1, 2), keepdims=True)
    masks = tf.math.divide_no_nan(masks - low, high - low)

    def masked_scores(row):
        x, mask, target = row  # [H, W, 3], [H, W, M], class
        masked = x[tf.newaxis] * tf.transpose(mask, [2, 0, 1])[..., tf.newaxis]  # [M, H, W, 3]
        return e.head(e.features(masked))[:, target]

    scores = tf.map_fn(masked_scores, (e.inputs, masks, e.targets), fn_output_signature=tf.float32,
                       parallel_iterations=1)  # one image's M passes at a time bounds the memory
    return _spread(tf.nn.softmax(scores, axis=-1), chosen, int(e.activations.shape[-1]))


def ablationcam(e: Evidence) -> tf.Tensor:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020, eq. 3): w_k = (y_c - y_c^k) / y_c, where y_c^k is the
    class logit with channel k of A set to zero.

    Each ablation runs through the head only (A -> logits), never the backbone, as one batch of M
    ablated copies per image; only the `channels` most activated channels are ablated (the rest
    weigh 0). In a token layer channel k is zeroed in every token, the class token included (as
    pytorch-grad-cam's AblationLayerVit). As in the paper, the drop is divided by y_c: a class with a
    negative logit has its map's sign turned, so explain classes the model scores positively.
    """
    chosen = top_channels(e.activations, e.channels)  # [N, M]
    channels = int(e.activations.shape[-1])

    def ablated_scores(row):
        output, ablate, target = row  # the head's input [h, w, K] or [T, K], [M], class
        keep = 1.0 - tf.one_hot(ablate, channels, dtype=output.dtype)  # [M, K]
        keep = tf.reshape(keep, [-1, *[1] * (output.shape.rank - 1), channels])
        return e.head(output[tf.newaxis] * keep)[:, target]

    ablated = tf.map_fn(ablated_scores, (e.layer_output, chosen, e.targets), fn_output_signature=tf.float32,
                        parallel_iterations=1)  # [N, M]
    weights = tf.math.divide_no_nan(e.scores[:, tf.newaxis] - ablated, e.scores[:, tf.newaxis])
    return _spread(weights, chosen, channels)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gradcam", gradcam),
        Method("cam", cam, needs_gradient=False, needs_gap_dense_head=True, fusable=False),
        Method("gradcampp", gradcam_plus_plus),
        Method("hirescam", hirescam),
        Method("layercam", layercam),
        Method("xgradcam", xgradcam),
        Method("eigencam", eigencam, needs_gradient=False),
        # Guided Grad-CAM (arXiv 1610.02391, section 3): the Grad-CAM map, upsampled, times guided
        # backpropagation at input resolution (export/guided.py); the explainer adds the product.
        Method("guided_gradcam", gradcam, guided=True, fusable=False),
        Method("scorecam", scorecam, needs_gradient=False, fusable=False, warmed=False, channel_limit=ChannelLimit(
            64, "scores the N most activated channels, one forward pass each (0: all)")),
        Method("ablationcam", ablationcam, needs_gradient=False, fusable=False, channel_limit=ChannelLimit(
            64, "ablates the N most activated channels, one pass through the head each (0: all)")),
    )
}


def get_method(name: str) -> Method:
    """The method called `name`; raises ValueError naming the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]
