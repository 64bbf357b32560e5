"""Every CAM method against its paper's formula written here in numpy, and the known relations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tensorflow as tf

import synthetic

# numpy float64 formulas vs the graph's float32: maps in [0,1] agree to well under 1e-4.
MAP_TOLERANCE = 1e-4


def _channel_sum(a, weights):
    return np.einsum("hwk,k->hw", a, weights)


def np_gradcam(a, g, w):
    return _channel_sum(a, g.mean(axis=(0, 1)))


def np_cam(a, g, w):
    return _channel_sum(a, w)


def np_gradcampp(a, g, w):
    denominator = 2 * g**2 + a.sum(axis=(0, 1)) * g**3
    alpha = np.divide(g**2, denominator, out=np.zeros_like(g), where=denominator != 0)
    return _channel_sum(a, (alpha * np.maximum(g, 0)).sum(axis=(0, 1)))


def np_hirescam(a, g, w):
    return (g * a).sum(axis=-1)


def np_layercam(a, g, w):
    return (np.maximum(g, 0) * a).sum(axis=-1)


def np_xgradcam(a, g, w):
    total = a.sum(axis=(0, 1))
    share = np.divide(a, total, out=np.zeros_like(a), where=total != 0)
    return _channel_sum(a, (share * g).sum(axis=(0, 1)))


def np_eigencam(a, g, w):
    h, wd, k = a.shape
    flat = a.reshape(h * wd, k)
    _, _, vt = np.linalg.svd(flat - flat.mean(axis=0), full_matrices=False)
    projection = flat @ vt[0]
    if np.corrcoef(projection, flat.sum(axis=1))[0, 1] < 0:
        projection = -projection
    return projection.reshape(h, wd)


REFERENCES = {
    "gradcam": np_gradcam,
    "cam": np_cam,
    "gradcampp": np_gradcampp,
    "hirescam": np_hirescam,
    "layercam": np_layercam,
    "xgradcam": np_xgradcam,
    "eigencam": np_eigencam,
}


@pytest.fixture(scope="module")
def shapes_evidence(shapes_model):
    """Activations, gradients of the target logit and dense kernel, computed eagerly with Keras."""
    import keras

    model = keras.models.load_model(shapes_model)
    model.get_layer("predictions").activation = keras.activations.linear
    grad_model = keras.Model(model.inputs, [model.get_layer("last_conv").output, model.output])
    images, labels, _ = synthetic.dataset(6, seed=21)
    class_index = np.array([-1, 0, 1, 2, -1, 1], np.int32)
    with tf.GradientTape() as tape:
        a, logits = grad_model(images.astype(np.float32), training=False)
        targets = np.where(class_index < 0, np.argmax(logits, axis=1), class_index)
        score = tf.reduce_sum(tf.gather(logits, targets, batch_dims=1))
    g = tape.gradient(score, a).numpy().astype(np.float64)
    kernel = model.get_layer("predictions").kernel.numpy().astype(np.float64)
    return images, class_index, targets, a.numpy().astype(np.float64), g, kernel


@pytest.mark.parametrize("method", list(REFERENCES))
def test_method_matches_numpy_formula(shapes_export, load, shapes_evidence, method):
    images, class_index, targets, a, g, kernel = shapes_evidence
    out = load(shapes_export).signatures[method](images=images, class_index=class_index)
    np.testing.assert_array_equal(out["class_index"].numpy(), targets)
    for i in range(len(images)):
        raw = REFERENCES[method](a[i], g[i], kernel[:, targets[i]])
        heat = np.maximum(raw, 0)
        heat = heat / heat.max() if heat.max() > 0 else heat
        np.testing.assert_allclose(out["heatmap_lowres"].numpy()[i], heat, atol=MAP_TOLERANCE, err_msg=method)
        np.testing.assert_allclose(
            out["heatmap"].numpy()[i], cv2.resize(heat.astype(np.float32), (64, 64)), atol=MAP_TOLERANCE
        )


def test_hirescam_equals_gradcam_for_gap_head(shapes_export, load):
    """With global average pooling the gradient is constant over space, so HiResCAM = Grad-CAM."""
    images, _, _ = synthetic.dataset(4, seed=22)
    class_index = np.array([-1, 0, 1, 2], np.int32)
    model = load(shapes_export)
    hires = model.signatures["hirescam"](images=images, class_index=class_index)["heatmap"].numpy()
    grad = model.signatures["gradcam"](images=images, class_index=class_index)["heatmap"].numpy()
    assert hires.max() > 0.9
    np.testing.assert_allclose(hires, grad, atol=1e-5)


def test_layercam_equals_hirescam_for_nonnegative_gradients():
    from export.methods import Evidence, hirescam, layercam

    rng = np.random.default_rng(0)
    a = tf.constant(rng.random((2, 7, 7, 16)), tf.float32)
    g = tf.constant(rng.random((2, 7, 7, 16)), tf.float32)
    np.testing.assert_allclose(layercam(Evidence(a, g, None)), hirescam(Evidence(a, g, None)), rtol=1e-6)
    signed = tf.constant(rng.standard_normal((2, 7, 7, 16)), tf.float32)  # and not otherwise
    assert np.abs(layercam(Evidence(a, signed, None)) - hirescam(Evidence(a, signed, None))).max() > 0.1


@pytest.mark.parametrize("method", list(REFERENCES))
def test_pointing_game_per_method(shapes_export, load, method):
    images, labels, boxes = synthetic.dataset(100, seed=99)
    out = load(shapes_export).signatures[method](images=images, class_index=labels.astype(np.int32))
    hit_rate = synthetic.pointing_hits(out["heatmap"].numpy(), boxes).mean()
    print(f"pointing game {method}: {hit_rate:.0%}")
    assert hit_rate >= 0.9


@pytest.mark.parametrize("method", ["gradcam", "cam", "gradcampp"])
def test_top_k_maps_equal_single_class_calls(shapes_export, load, method):
    model = load(shapes_export)
    images, _, _ = synthetic.dataset(3, seed=23)
    out = model.signatures[method](images=images, class_index=np.full(3, -1, np.int32))
    classes = out["heatmaps_class_index"].numpy()
    np.testing.assert_array_equal(classes, out["top_k_indices"].numpy()[:, :2])
    for j in range(2):
        single = model.signatures[method](images=images, class_index=classes[:, j].astype(np.int32))
        np.testing.assert_allclose(out["heatmaps"].numpy()[:, j], single["heatmap"].numpy(), atol=1e-5)


def test_feature_maps_are_the_most_activated_channels(shapes_export, shapes_evidence, load):
    images, _, _, a, _, _ = shapes_evidence
    out = load(shapes_export).signatures["feature_maps"](images=images[:2])
    for i in range(2):
        expected = np.argsort(-a[i].mean(axis=(0, 1)))[:36]
        np.testing.assert_array_equal(np.sort(out["feature_channels"].numpy()[i]), np.sort(expected))
        first = out["feature_channels"].numpy()[i][0]
        fmap = a[i][:, :, first]
        np.testing.assert_allclose(out["feature_maps"].numpy()[i][0], fmap / fmap.max(), atol=1e-5)


def test_xla_compiled_signatures_give_the_same_maps(jit_export, shapes_export, load):
    """--jit-compile: the numeric core runs under XLA, strings and PNG outside; same results."""
    jit = jit_export
    images, _, _ = synthetic.dataset(3, seed=24)
    class_index = np.array([-1, 0, 2], np.int32)
    for method in ("gradcam", "eigencam"):
        compiled = load(jit).signatures[method](images=images, class_index=class_index)
        plain = load(shapes_export).signatures[method](images=images, class_index=class_index)
        for key in ("heatmap", "heatmaps", "probabilities"):
            np.testing.assert_allclose(compiled[key].numpy(), plain[key].numpy(), atol=1e-5)
        np.testing.assert_array_equal(compiled["top_k_labels"].numpy(), plain["top_k_labels"].numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="class_index"):
        load(jit).signatures["gradcam"](images=images[:1], class_index=np.array([3], np.int32))
