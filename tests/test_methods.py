"""Every CAM method against its paper's formula written here (numpy, or eager Keras where the method
runs the model again), and the known relations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tensorflow as tf

import eager
import synthetic
from camserve.export.methods import METHODS


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
def shapes_keras(shapes_model):
    """The trained shapes model, eager Keras, with logits as its output."""
    return eager.logits_model(shapes_model)


@pytest.fixture(scope="module")
def shapes_evidence(shapes_keras):
    """Activations, gradients of the target logit and dense kernel, computed eagerly with Keras."""
    images, labels, _ = synthetic.dataset(6, seed=21)
    class_index = np.array([-1, 0, 1, 2, -1, 1], np.int32)
    targets, a, g = eager.evidence(shapes_keras, "last_conv", images, class_index)
    kernel = shapes_keras.get_layer("predictions").kernel.numpy().astype(np.float64)
    return images, class_index, targets, a, g, kernel


def _maps(method: str, images: np.ndarray, class_index: np.ndarray, size: int | None = None):
    """eager.reference's formula: `method`'s normalised maps of a run's evidence at last_conv (resized to `size`)."""
    def maps(run):
        targets, a, g = run.evidence("last_conv", images, class_index)
        kernel = run.model.get_layer("predictions").kernel.numpy().astype(np.float64)
        heat = [eager.normalised(REFERENCES[method](a[i], g[i], kernel[:, targets[i]])) for i in range(len(a))]
        return np.stack([eager.resized(h, size) if size else h for h in heat])

    return maps


@pytest.mark.parametrize("method", list(REFERENCES))
def test_method_matches_numpy_formula(shapes_export, shapes_model, load, shapes_evidence, method):
    images, class_index, targets, _, _, _ = shapes_evidence
    out = load(shapes_export).signatures[method](images=images, class_index=class_index)
    np.testing.assert_array_equal(out["class_index"].numpy(), targets)
    for key, size in (("heatmap_lowres", None), ("heatmap", synthetic.SIZE)):
        expected, tolerance = eager.reference(_maps(method, images, class_index, size), shapes_model)
        eager.assert_within(out[key].numpy(), expected, tolerance, f"{method} {key}")


def _most_activated(a: np.ndarray, count: int) -> np.ndarray:
    return np.argsort(-a.mean(axis=(0, 1)))[:count]


def test_scorecam_matches_its_formula(shapes_export, shapes_model, load, shapes_evidence):
    """Wang et al. eq. 5-8: masks H_k = minmax(upsample(A_k)), weights softmax_k y_c(x ⊙ H_k), scored here
    with the eager Keras model, the masked images of one image as one batch."""
    images, class_index, _, _, _, _ = shapes_evidence
    out = load(shapes_export).signatures["scorecam"](images=images, class_index=class_index)

    def maps(run):
        targets, a, _ = run.evidence("last_conv", images, class_index)
        heat = []
        for i in range(len(images)):
            channels = _most_activated(a[i], METHODS["scorecam"].channel_limit.default)  # the export's default
            masks = np.stack([eager.resized(a[i][:, :, k], synthetic.SIZE) for k in channels]).astype(np.float64)
            low, high = masks.min(axis=(1, 2), keepdims=True), masks.max(axis=(1, 2), keepdims=True)
            masks = np.divide(masks - low, high - low, out=np.zeros_like(masks), where=high > low)
            masked = (images[i][None] * masks[..., None]).astype(run.dtype)
            scores = np.asarray(run.model(masked, training=False)[:, targets[i]], np.float64)
            weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
            heat.append(eager.normalised(np.einsum("hwk,k->hw", a[i][:, :, channels], weights)))
        return np.stack(heat)

    expected, tolerance = eager.reference(maps, shapes_model)
    eager.assert_within(out["heatmap_lowres"].numpy(), expected, tolerance, "scorecam")


def test_ablationcam_matches_its_formula(shapes_export, shapes_model, load, shapes_evidence):
    """Desai & Ramaswamy eq. 3: w_k = (y_c - y_c^k) / y_c, the head (GAP + dense) written in numpy."""
    images, class_index, _, _, _, _ = shapes_evidence
    out = load(shapes_export).signatures["ablationcam"](images=images, class_index=class_index)

    def maps(run):
        targets, a, _ = run.evidence("last_conv", images, class_index)
        dense = run.model.get_layer("predictions")
        kernel, bias = dense.kernel.numpy().astype(np.float64), dense.bias.numpy().astype(np.float64)
        heat = []
        for i in range(len(images)):
            c = targets[i]
            y = a[i].mean(axis=(0, 1)) @ kernel[:, c] + bias[c]
            weights = {}
            for k in _most_activated(a[i], METHODS["ablationcam"].channel_limit.default):  # the export's default
                ablated = a[i].copy()
                ablated[:, :, k] = 0
                weights[k] = (y - (ablated.mean(axis=(0, 1)) @ kernel[:, c] + bias[c])) / y
            heat.append(eager.normalised(sum(w * a[i][:, :, k] for k, w in weights.items())))
        return np.stack(heat)

    expected, tolerance = eager.reference(maps, shapes_model)
    eager.assert_within(out["heatmap_lowres"].numpy(), expected, tolerance, "ablationcam")


def _backprop_by_hand(model, images: np.ndarray, targets: np.ndarray, guided: bool = True) -> np.ndarray:
    """dy_c/d(pixels) with the shapes model's layers written out in TF ops; with `guided`, through a
    guided ReLU of this test's own (Springenberg et al.: gradient only where input and gradient are > 0)."""

    @tf.custom_gradient
    def guided_relu(x):
        return tf.nn.relu(x), lambda dy: dy * tf.cast(x > 0, x.dtype) * tf.cast(dy > 0, x.dtype)

    def conv(x, name):
        layer = model.get_layer(name)
        return (guided_relu if guided else tf.nn.relu)(tf.nn.conv2d(x, layer.kernel, 1, "SAME") + layer.bias)

    pixels = tf.constant(images, model.input.dtype)  # float32, or float64 for eager.reference's exact run
    with tf.GradientTape() as tape:
        tape.watch(pixels)
        x = tf.nn.max_pool2d(conv(pixels / 255.0, "conv1"), 2, 2, "VALID")
        x = tf.nn.max_pool2d(conv(x, "conv2"), 2, 2, "VALID")
        x = tf.reduce_mean(conv(x, "last_conv"), axis=(1, 2))
        dense = model.get_layer("predictions")
        score = tf.gather(x @ dense.kernel + dense.bias, targets, batch_dims=1)
    return tape.gradient(score, pixels).numpy()


def test_guided_gradcam_is_gradcam_times_guided_backprop(shapes_export, shapes_model, load, shapes_keras,
                                                         shapes_evidence):
    """Selvaraju et al. section 3: the upsampled Grad-CAM map times guided backpropagation, pixel by pixel."""
    images, class_index, targets, _, _, _ = shapes_evidence
    out = load(shapes_export).signatures["guided_gradcam"](images=images, class_index=class_index)
    guided = _backprop_by_hand(shapes_keras, images, targets)
    plain = _backprop_by_hand(shapes_keras, images, targets, guided=False)
    assert np.abs(guided - plain).max() > 0.1 * np.abs(plain).max()  # the gating changes the gradient
    gradcam_maps = _maps("gradcam", images, class_index, synthetic.SIZE)
    heatmap, tolerance = eager.reference(gradcam_maps, shapes_model)
    eager.assert_within(out["heatmap"].numpy(), heatmap, tolerance, "Grad-CAM's own map")

    def products(run):
        targets, _, _ = run.evidence("last_conv", images, class_index)
        return gradcam_maps(run)[..., None] * _backprop_by_hand(run.model, images, targets)

    expected, tolerance = eager.reference(products, shapes_model)
    eager.assert_within(out["guided"].numpy(), expected, tolerance, "guided")
    picture = cv2.imdecode(np.frombuffer(out["guided_png_bytes"].numpy()[0], np.uint8), cv2.IMREAD_UNCHANGED)
    assert picture.shape == (64, 64, 3) and picture.std() > 0


def test_guided_relus_gate_relu_layers_only_while_traced():
    """ReLU activations and ReLU(6) layers are guided (same forward values), other activations are named
    as unguided, and everything is restored after the block."""
    import keras

    from camserve.export.guided import guided_relus, survey

    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(16, activation="relu", name="dense_relu")(inputs)
    x = keras.layers.ReLU(6.0, name="relu6")(keras.layers.Dense(16, name="wide")(x))
    x = keras.layers.Dense(16, activation="swish", name="dense_swish")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(x))
    swaps = survey(model)
    assert swaps.guided == ["dense_relu", "relu6"] and swaps.unguided == {"silu"}  # Keras names swish silu
    x = tf.constant(np.random.default_rng(0).standard_normal((32, 4)) * 3, tf.float32)

    def forward_and_gradient():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
        return y.numpy(), tape.gradient(y, x).numpy()

    plain_y, plain_g = forward_and_gradient()
    with guided_relus(model):
        guided_y, guided_g = forward_and_gradient()
    np.testing.assert_array_equal(guided_y, plain_y)
    assert np.abs(guided_g - plain_g).max() > 1e-3
    _, after_g = forward_and_gradient()
    np.testing.assert_array_equal(after_g, plain_g)
    assert model.get_layer("dense_relu").activation is keras.activations.relu and "call" not in vars(
        model.get_layer("relu6")
    )


def test_fused_layercam_matches_the_papers_fusion(fused_export, shapes_model, load):
    """LayerCAM (Jiang et al. 2021) at conv2 and last_conv, each map normalised and scaled by tanh(2 M),
    then the element-wise max at the finer layer's size, normalised."""
    images, _, _ = synthetic.dataset(4, seed=25)
    class_index = np.array([-1, 0, 1, 2], np.int32)
    out = load(fused_export).signatures["layercam_fused"](images=images, class_index=class_index)

    def fused(size: int | None = None):
        def maps(run):
            _, activations, gradients = run.evidence(("conv2", "last_conv"), images, class_index)
            heat = []
            for i in range(len(images)):
                scaled = [np.tanh(2 * eager.normalised(np_layercam(a[i], g[i], None)))
                          for a, g in zip(activations, gradients)]
                heat.append(eager.normalised(np.maximum(scaled[0], eager.resized(scaled[1], 32))))
            return np.stack([eager.resized(h, size) if size else h for h in heat])

        return maps

    for key, size in (("heatmap_lowres", None), ("heatmap", synthetic.SIZE)):
        expected, tolerance = eager.reference(fused(size), shapes_model)
        eager.assert_within(out[key].numpy(), expected, tolerance, f"layercam_fused {key}")
    single = load(fused_export).signatures["layercam"](images=images, class_index=class_index)
    assert np.abs(single["heatmap"].numpy() - out["heatmap"].numpy()).max() > 0.1  # conv2 adds detail


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
    from camserve.export.methods import Evidence, hirescam, layercam

    rng = np.random.default_rng(0)
    a = tf.constant(rng.random((2, 7, 7, 16)), tf.float32)
    g = tf.constant(rng.random((2, 7, 7, 16)), tf.float32)
    np.testing.assert_allclose(layercam(Evidence(a, g, None)), hirescam(Evidence(a, g, None)), rtol=1e-6)
    signed = tf.constant(rng.standard_normal((2, 7, 7, 16)), tf.float32)  # and not otherwise
    assert np.abs(layercam(Evidence(a, signed, None)) - hirescam(Evidence(a, signed, None))).max() > 0.1


@pytest.mark.parametrize("method", [*METHODS, "layercam_fused", "gradcam_fused"])  # fused: what fused_export has
def test_pointing_game_per_method(shapes_export, fused_export, load, method):
    images, labels, boxes = synthetic.dataset(100, seed=99)
    model = load(fused_export if method.endswith("_fused") else shapes_export)
    out = model.signatures[method](images=images, class_index=labels.astype(np.int32))
    hit_rate = synthetic.pointing_hits(out["heatmap"].numpy(), boxes).mean()
    print(f"pointing game {method}: {hit_rate:.0%}")
    assert hit_rate >= 0.9


@pytest.mark.parametrize("method", ["gradcam", "cam", "gradcampp", "scorecam", "ablationcam", "guided_gradcam"])
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


@pytest.mark.slow  # the XLA export and its compilations
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
