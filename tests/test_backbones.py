"""Any backbone: keras.applications models, nested transfer-learning models, softmax outputs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tensorflow as tf

import synthetic

# ResNet50 and VGG16 are covered in test_export.py; these need automatic target discovery too.
APPLICATIONS = {
    "mobilenet_v2": "out_relu",
    "efficientnetb0": "top_activation",
    "densenet121": "relu",
    "xception": "block14_sepconv2_act",
    "convnexttiny": "add_",  # the residual add ending the last block (numbered by Keras)
}


def _export(backbone, path, methods=("gradcam",), **kwargs):
    notes = []
    model_dir = synthetic.export_model(backbone, methods, "m", path, warmup_batch_sizes=(1,), feature_maps=0,
                                       log=notes.append, **kwargs)
    return model_dir, notes


@pytest.mark.real
@pytest.mark.parametrize("name, target", APPLICATIONS.items())
def test_application_exports_and_explains(tmp_path, load, name, target):
    started = time.perf_counter()
    model_dir, notes = _export(name, tmp_path)
    assert any(f"target layer '{target}" in note for note in notes), notes
    signature = load(model_dir).signatures["gradcam"]
    size = load(model_dir).loaded.signatures["explain"].structured_input_signature[1]["images"].shape[1]
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    out = signature(images=images, class_index=np.array([-1, 7], np.int32))
    heat = out["heatmap"].numpy()
    assert heat.shape == (2, size, size) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    print(f"{name}: exported in {time.perf_counter() - started:.0f}s, target {target}")


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_nested_transfer_learning_model_exports_without_graph_disconnected(transfer_export, load, kind):
    """The target layer lives inside the nested base; CAM works through the new GAP + dense head."""
    import keras

    model, model_dir, notes = transfer_export(kind)
    assert any("target layer 'out_relu'" in note for note in notes), notes
    assert any("logits before the softmax" in note for note in notes), notes
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    saved = load(model_dir)
    out = saved.signatures["gradcam"](images=images, class_index=np.array([-1, 2], np.int32))
    cam = saved.signatures["cam"](images=images, class_index=np.array([-1, 2], np.int32))
    # Same predictions as the user's model; CAM = Grad-CAM through the GAP + dense head.
    np.testing.assert_allclose(out["probabilities"].numpy(), model(images.astype(np.float32)).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["heatmap"].numpy(), cam["heatmap"].numpy(), atol=1e-5)
    # The score is the logit: softmax(logits) reproduces the model's probabilities.
    np.testing.assert_allclose(
        tf.nn.softmax(out["logits"]).numpy(), model(images.astype(np.float32)).numpy(), atol=1e-5
    )
    assert keras.backend.backend() == "tensorflow"


def test_final_softmax_layer_is_removed_for_the_score(tmp_path, load, shapes_model):
    import keras

    shapes = keras.models.load_model(shapes_model)
    shapes.get_layer("predictions").activation = keras.activations.linear
    model = keras.Model(shapes.input, keras.layers.Softmax()(shapes.output))
    path = tmp_path / "softmax_layer.keras"
    model.save(path)
    model_dir, notes = _export(str(path), tmp_path)
    assert any("Softmax layer" in note for note in notes), notes
    images, _, _ = synthetic.dataset(2, seed=5)
    out = load(model_dir).signatures["gradcam"](images=images, class_index=np.array([-1, -1], np.int32))
    np.testing.assert_allclose(out["logits"].numpy(), shapes(images.astype(np.float32)).numpy(), atol=1e-4)


def test_named_target_layer_and_unknown_layer(tmp_path, shapes_model):
    _, notes = _export(str(shapes_model), tmp_path, target_layer="conv2")
    assert any("target layer 'conv2' (32, 32, 32)" in note for note in notes), notes
    with pytest.raises(ValueError, match="no such layer"):
        _export(str(shapes_model), tmp_path, target_layer="nope")
