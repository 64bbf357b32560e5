"""The exported explainer against independent references: eager Grad-CAM, CAM, known localisation."""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pytest
import tensorflow as tf

import eager
import synthetic
from images import random_images

EXPLAIN_OUTPUTS = {
    "probabilities": (tf.float32, 2),
    "logits": (tf.float32, 2),
    "class_index": (tf.int32, 1),
    "class_label": (tf.string, 1),
    "score": (tf.float32, 1),
    "top_k_indices": (tf.int32, 2),
    "top_k_scores": (tf.float32, 2),
    "top_k_labels": (tf.string, 2),
    "heatmap": (tf.float32, 3),
    "heatmap_uint8": (tf.uint8, 3),
    "heatmap_png_bytes": (tf.string, 1),
    "heatmap_lowres": (tf.float32, 3),
    "error": (tf.string, 1),
}
PREDICT_OUTPUTS = {k: v for k, v in EXPLAIN_OUTPUTS.items() if not k.startswith("heatmap")}


def reference_gradcam(layer: str, preprocess, images: np.ndarray, class_index: np.ndarray):
    """eager.reference's formula: Grad-CAM as the paper writes it, from a run's evidence (a tape), a numpy loop
    over the channels, cv2."""
    def maps(run):
        _, activations, grads = run.evidence(layer, images, class_index, preprocess)
        heatmaps = []
        for a, g in zip(activations, grads):
            pooled = g.mean(axis=(0, 1))
            weighted = a.copy()
            for k in range(weighted.shape[-1]):
                weighted[:, :, k] *= pooled[k]
            heat = np.maximum(weighted.sum(axis=-1), 0)
            heat = heat / heat.max() if heat.max() > 0 else heat
            heatmaps.append(cv2.resize(heat, images.shape[2:0:-1], interpolation=cv2.INTER_LINEAR))
        return np.stack(heatmaps)

    return maps


@pytest.mark.real
@pytest.mark.parametrize(
    "fixture, layer, preprocess",
    [
        ("resnet50", "conv5_block3_out", "resnet50"),
        ("vgg16", "block5_conv3", "vgg16"),
    ],
)
def test_gradcam_matches_eager_reference(request, load, fixture, layer, preprocess):
    import keras

    model, path = request.getfixturevalue(fixture)
    preprocess_fn = getattr(keras.applications, preprocess).preprocess_input
    images = random_images(2, 224, 3)
    class_index = np.array([-1, 17], np.int32)
    expected, tolerance = eager.reference(reference_gradcam(layer, preprocess_fn, images, class_index), model)
    assert expected.max() > 0.9 and expected.min() < 0.1, "the reference map is degenerate"
    out = load(path).signatures["gradcam"](images=images, class_index=class_index)
    eager.assert_within(out["heatmap"].numpy(), expected, tolerance, fixture)
    assert out["class_index"].numpy()[1] == 17


def test_predictions_equal_keras_model_in_inference_mode(resnet50, load):
    """preprocess_input runs in the graph, BatchNorm in inference mode: logits equal Keras'."""
    import keras

    model, path = resnet50
    images = random_images(2, 224, 4)
    expected = model(keras.applications.resnet50.preprocess_input(images.astype(np.float32)), training=False)
    out = load(path).signatures["predict"](images=images)
    np.testing.assert_allclose(out["logits"].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["probabilities"].numpy(), tf.nn.softmax(expected).numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["class_index"].numpy(), np.argmax(expected, axis=1))


def test_cam_equals_gradcam_for_gap_dense_head(resnet50, load):
    _, path = resnet50
    model = load(path)
    images, class_index = random_images(3, 224, 5), np.array([-1, 2, 999], np.int32)
    cam = model.signatures["cam"](images=images, class_index=class_index)
    gradcam = model.signatures["gradcam"](images=images, class_index=class_index)
    assert cam["heatmap"].numpy().max() > 0.9
    np.testing.assert_allclose(cam["heatmap"].numpy(), gradcam["heatmap"].numpy(), atol=1e-5)


def test_cam_lowres_is_dense_kernel_dot_features(resnet50, load):
    """CAM: Σ_k w_{k,c} A_k at 7x7, ReLU, max-normalised: the paper's formula in numpy."""
    import keras

    model, path = resnet50
    images = np.repeat(random_images(1, 224, 6), 3, 0)
    classes = np.array([5, 700, 321], np.int32)
    out = load(path).signatures["cam"](images=images, class_index=classes)

    def maps(run):
        _, a, _ = run.evidence("conv5_block3_out", images, classes, keras.applications.resnet50.preprocess_input)
        kernel = run.model.get_layer("predictions").kernel.numpy().astype(np.float64)
        return np.stack([eager.normalised(a[i] @ kernel[:, c]) for i, c in enumerate(classes)])

    expected, tolerance = eager.reference(maps, model)
    eager.assert_within(out["heatmap_lowres"].numpy(), expected, tolerance, "cam")
    assert (expected.max(axis=(1, 2)) > 0).any()  # not all three maps empty


def test_cam_dot_then_resize_equals_resize_then_dot(resnet50):
    """Bilinear resize is linear: the dot product at 7x7 then resize equals the eager order (resize, then dot)."""
    import keras

    from camserve.export.explainer import resize_maps

    model, _ = resnet50
    features = keras.Model(model.input, model.get_layer("conv5_block3_out").output)
    a = features(keras.applications.resnet50.preprocess_input(random_images(1, 224, 0).astype(np.float32))).numpy()[0]
    w = model.get_layer("predictions").kernel.numpy()[:, 42]
    upsampled = np.stack([cv2.resize(a[:, :, k], (224, 224)) for k in range(a.shape[-1])], axis=-1)
    eager_way = upsampled @ w  # upsample 2048 maps, then dot
    ours = resize_maps(tf.constant((a @ w)[None]), (224, 224)).numpy()[0]
    np.testing.assert_allclose(ours, eager_way, rtol=1e-4, atol=1e-4 * np.abs(eager_way).max())


def test_normalise_keeps_zero_maps_zero_and_scales_to_one():
    from camserve.export.explainer import normalise

    raw = tf.constant([np.zeros((7, 7)), -np.ones((7, 7)), np.arange(49.0).reshape(7, 7) - 10], tf.float32)
    out = normalise(raw).numpy()
    assert not np.isnan(out).any()
    assert (out[0] == 0).all() and (out[1] == 0).all()
    assert out[2].max() == 1.0 and out[2].min() == 0.0
    np.testing.assert_allclose(out[2], np.maximum(np.arange(49.0).reshape(7, 7) - 10, 0) / 38, atol=1e-6)


def test_gradient_does_not_flow_through_the_backbone(resnet50, load):
    """The explain graph of ResNet50 (head: GAP + dense) has no convolution gradient at all."""
    graph = load(resnet50[1]).loaded.signatures["explain"].graph.as_graph_def()
    ops = [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]
    assert "Conv2D" in ops and "MatMul" in ops
    assert not [op for op in ops if op.startswith("Conv2DBackprop")]


def test_batch_equals_single_calls_and_class_index_per_image(shapes_export, load):
    model = load(shapes_export)
    images, _, _ = synthetic.dataset(4, seed=11)
    class_index = np.array([-1, 0, 2, -1], np.int32)
    for method in ("gradcam", "cam"):
        batch = model.signatures[method](images=images, class_index=class_index)
        predicted = np.argmax(batch["probabilities"].numpy(), axis=1)
        expected_class = np.where(class_index < 0, predicted, class_index)
        np.testing.assert_array_equal(batch["class_index"].numpy(), expected_class)
        for i in range(4):
            single = model.signatures[method](images=images[i : i + 1], class_index=class_index[i : i + 1])
            for key in ("heatmap", "probabilities", "score"):
                np.testing.assert_allclose(batch[key].numpy()[i], single[key].numpy()[0], atol=1e-5)
        # A different class gives a different map: the class really selects the explanation.
        another_class = np.array([(expected_class[0] + 1) % 3], np.int32)
        other = model.signatures[method](images=images[:1], class_index=another_class)
        assert np.abs(other["heatmap"].numpy()[0] - batch["heatmap"].numpy()[0]).max() > 0.1


def test_signature_contract(resnet50, load):
    """The SignatureDefs TF Serving serves: every name, input and output with its dtype and shape."""
    from camserve.serving.servables.session import SavedModelSession

    with SavedModelSession(resnet50[1]) as session:
        defs = dict(session.signature_defs)
    names = {"explain", "explain_bytes", "predict", "predict_bytes", "gradcam", "gradcam_bytes", "cam", "cam_bytes",
             "serving_default"}
    assert set(defs) - {"__saved_model_init_op"} == names | {"feature_maps", "feature_maps_bytes", "explain_compact",
                                                              "predict_compact", "gradcam_compact", "cam_compact"}

    def spec(info) -> tuple[tf.DType, list[int]]:
        return tf.as_dtype(info.dtype), [d.size for d in info.tensor_shape.dim]

    for name in names:
        inputs, outputs = defs[name].inputs, defs[name].outputs
        image_key = "image_bytes" if name.endswith("_bytes") or name == "serving_default" else "images"
        expected_inputs = {image_key} | (set() if name.startswith("predict") else {"class_index"})
        expected_inputs |= {"method"} if name.startswith("explain") else set()
        assert set(inputs) == expected_inputs, name
        if image_key == "images":
            assert spec(inputs["images"]) == (tf.uint8, [-1, 224, 224, 3])
        else:
            assert spec(inputs["image_bytes"]) == (tf.string, [-1])
        if "class_index" in inputs:
            assert spec(inputs["class_index"]) == (tf.int32, [-1])
        if "method" in inputs:
            assert spec(inputs["method"]) == (tf.string, [-1])
        expected_outputs = PREDICT_OUTPUTS if name.startswith("predict") else EXPLAIN_OUTPUTS
        if name.startswith("explain"):
            expected_outputs = {**expected_outputs, "feature_maps": (tf.float32, 4), "feature_channels": (tf.int32, 2)}
        assert set(outputs) == set(expected_outputs), name
        for key, (dtype, rank) in expected_outputs.items():
            assert spec(outputs[key])[0] == dtype, (name, key)
            assert len(spec(outputs[key])[1]) == rank and spec(outputs[key])[1][0] == -1, (name, key)
    # serving_default is the first listed method's bytes signature
    assert set(defs["serving_default"].inputs) == {"image_bytes", "class_index"}
    model = load(resnet50[1])
    out = model.signatures["gradcam"](images=random_images(1, 224, 0), class_index=np.array([-1], np.int32))
    assert out["heatmap"].shape == (1, 224, 224) and out["heatmap_lowres"].shape == (1, 7, 7)
    assert out["top_k_labels"].shape == (1, 5)
    heat = out["heatmap"].numpy()
    assert heat.min() >= 0 and heat.max() <= 1
    np.testing.assert_array_equal(out["heatmap_uint8"].numpy(), np.round(heat * 255).astype(np.uint8))
    png = cv2.imdecode(np.frombuffer(out["heatmap_png_bytes"].numpy()[0], np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(png, out["heatmap_uint8"].numpy()[0])


def test_labels_travel_inside_the_savedmodel(resnet50, load):
    labels = (pathlib.Path(__file__).parent.parent / "export/data/imagenet_classes.txt").read_text().splitlines()
    out = load(resnet50[1]).signatures["predict"](images=random_images(1, 224, 0))
    indices = out["top_k_indices"].numpy()[0]
    assert [s.decode() for s in out["top_k_labels"].numpy()[0]] == [labels[i] for i in indices]
    assert labels[0] == "tench" and len(labels) == 1000


def test_each_weight_is_saved_once(resnet50):
    """The checkpoint holds the model's weights, each once, with their values (not the Keras layers' copies)."""
    import tensorflow as tf

    model, path = resnet50
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    saved = sorted((reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
                    if name.endswith("/.ATTRIBUTES/VARIABLE_VALUE")), key=lambda a: (a.shape, a.sum()))
    weights = sorted((w.numpy() for w in model.weights), key=lambda a: (a.shape, a.sum()))
    assert len(saved) == len(weights) == 320
    assert all(np.array_equal(a, b) for a, b in zip(saved, weights))


def test_bytes_signatures_match_tensor_signatures(shapes_export, load):
    model = load(shapes_export)
    images, _, _ = synthetic.dataset(2, seed=12)
    pngs = np.array([tf.io.encode_png(image).numpy() for image in images], dtype=object)
    class_index = np.array([-1, 1], np.int32)
    for method in ("gradcam", "cam"):
        from_tensor = model.signatures[method](images=images, class_index=class_index)
        from_png = model.signatures[f"{method}_bytes"](image_bytes=pngs, class_index=class_index)
        np.testing.assert_allclose(from_png["heatmap"].numpy(), from_tensor["heatmap"].numpy(), atol=1e-6)
    predicted = model.signatures["predict_bytes"](image_bytes=pngs)
    np.testing.assert_allclose(
        predicted["probabilities"].numpy(),
        model.signatures["predict"](images=images)["probabilities"].numpy(),
        atol=1e-6,
    )
    # A larger JPEG is decoded and resized in the graph.
    big = cv2.resize(images[0], (200, 150))
    jpeg = tf.io.encode_jpeg(big).numpy()
    out = model.signatures["gradcam_bytes"](image_bytes=np.array([jpeg], object), class_index=np.array([-1], np.int32))
    assert out["heatmap"].shape == (1, 64, 64)


def test_no_python_callback_ops_in_any_signature(resnet50):
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((resnet50[1] / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert "Conv2D" in ops and "DecodeImage" in ops  # the whole graph was scanned
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc", "NumpyFunction"}


def test_warmup_records_build_the_executors_our_callers_use_and_run(resnet50, load):
    """One executor, that of every call the client, CLI and page make by default: explain_bytes with its
    one output set, first with a row of each method and a prediction, then a prediction alone (so that
    every branch has run before a real call), then at every batch size; none for the views (a method's
    own signatures, predict, feature_maps, serving_default, *_compact) nor the images inputs."""
    from tensorflow_serving.apis import prediction_log_pb2

    from camserve.serving.servables.warmup import WARMUP_FILE

    path = resnet50[1] / WARMUP_FILE
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    summary = {"class_index", "class_label", "score", "top_k_indices", "top_k_scores", "top_k_labels", "error"}
    explain = summary | {"heatmap_png_bytes"}
    seen = []
    for log in logs:
        request = log.predict_log.request
        sizes = {tensor.tensor_shape.dim[0].size for tensor in request.inputs.values()}
        assert len(sizes) == 1, request.model_spec.signature_name
        methods = tuple(m.decode() for m in tf.make_ndarray(request.inputs["method"])) if "method" in request.inputs \
            else ()
        seen.append((request.model_spec.signature_name, methods, frozenset(request.output_filter)))
    assert seen == [("explain_bytes", ("gradcam", "cam", "predict"), explain), ("explain_bytes", ("predict",), explain),
                    ("explain_bytes", ("gradcam",), explain), ("explain_bytes", ("gradcam",) * 2, explain)]
    model = load(resnet50[1])
    for log in logs:
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        model.signatures[request.model_spec.signature_name](**inputs)


def test_warmup_leaves_out_the_methods_whose_row_is_a_whole_call(shapes_export):
    """Score-CAM's row is one forward pass per channel, as long as a call: no warm-up record has one; every
    other method has its row in the first."""
    from camserve.export.methods import METHODS
    from camserve.serving.servables.warmup import read_warmup_requests

    rows = [[m.decode() for m in tf.make_ndarray(r.inputs["method"])] for r in read_warmup_requests(shapes_export)]
    assert rows[0] == [name for name, method in METHODS.items() if method.warmed] + ["predict"]
    assert not METHODS["scorecam"].warmed and all("scorecam" not in r for r in rows)


def test_aliases_run_their_targets_tensors_under_tf_servings_loader(resnet50, load):
    """serving_default and <name>_compact name the tensors of the signature they copy, so TF Serving
    builds no executor of theirs; their answers are those of their own TF2 functions."""
    from camserve.client.outputs import EXPLAIN, SUMMARY
    from camserve.serving.servables.session import SavedModelSession

    images = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), np.uint8)
    jpegs = np.array([tf.io.encode_jpeg(image).numpy() for image in images], dtype=object)
    tf2 = load(resnet50[1])
    with SavedModelSession(resnet50[1]) as session:
        defs = session.signature_defs
        for alias, target, outputs in (("serving_default", "gradcam_bytes", None), ("gradcam_compact", "gradcam_bytes",
                                       EXPLAIN), ("cam_compact", "cam_bytes", EXPLAIN),
                                       ("explain_compact", "explain_bytes", EXPLAIN),
                                       ("predict_compact", "predict_bytes", SUMMARY)):
            assert set(defs[alias].outputs) == set(outputs or defs[target].outputs), alias
            assert all(info.name == defs[target].inputs[key].name for key, info in defs[alias].inputs.items())
            assert all(info.name == defs[target].outputs[key].name for key, info in defs[alias].outputs.items())
            inputs = {"image_bytes": jpegs, "class_index": np.array([-1, 7], np.int32),
                      "method": np.array([b"cam", b"gradcam"], dtype=object)}
            inputs = {k: v for k, v in inputs.items() if k in defs[alias].inputs}
            served = session.run_signature(alias, inputs)
            expected = tf2.signatures[alias](**{k: tf.constant(v) for k, v in inputs.items()})
            assert set(served) == set(expected), alias
            for name, value in served.items():
                if value.dtype.kind == "f":
                    np.testing.assert_allclose(value, expected[name].numpy(), atol=1e-4, err_msg=name)
                elif not name.endswith("_png_bytes"):
                    assert value.tolist() == expected[name].numpy().tolist(), (alias, name)
            if "heatmap_png_bytes" in served:
                assert tf.io.decode_png(served["heatmap_png_bytes"][1]).shape == (224, 224, 1), alias


def test_out_of_range_class_index_is_an_invalid_argument(shapes_export, load):
    model = load(shapes_export)
    images, _, _ = synthetic.dataset(1, seed=13)
    for bad in (3, -2):
        with pytest.raises(tf.errors.InvalidArgumentError, match="class_index"):
            model.signatures["gradcam"](images=images, class_index=np.array([bad], np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one entry per image"):
        model.signatures["gradcam"](images=images, class_index=np.array([0, 1], np.int32))


def test_cam_on_vgg16_is_a_clear_error_and_writes_nothing(tmp_path):

    with pytest.raises(ValueError, match="global average pooling"):
        synthetic.export_model("vgg16", ["cam"], "vgg", tmp_path)
    assert not (tmp_path / "vgg").exists() or not any((tmp_path / "vgg").iterdir())


def test_versions_increase_and_no_staging_directory_remains(shapes_model, tmp_path):

    first = synthetic.export_model(shapes_model, ["gradcam"], "m", tmp_path, warmup_batch_sizes=(1,))
    second = synthetic.export_model(shapes_model, ["gradcam"], "m", tmp_path, warmup_batch_sizes=(1,))
    assert (first.name, second.name) == ("1", "2")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]
    with pytest.raises(FileExistsError):
        synthetic.export_model(shapes_model, ["gradcam"], "m", tmp_path, version=2)


def test_target_layers_refusals_are_clear(shapes_model, tmp_path):
    """--target-layers: an unknown layer, a single layer, no method to fuse and a cut that a skip
    connection crosses are refused in words before anything is written."""
    from camserve.export.backbone import load_backbone

    cases = {
        ("gradcam",): (["nope", "last_conv"], "no layer 'nope'"),
        ("layercam",): (["last_conv"], "at least two layers"),
        ("cam", "scorecam"): (["conv2", "last_conv"], "none is in --methods"),
    }
    for methods, (layers, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            synthetic.export_model(shapes_model, list(methods), "refused", tmp_path, target_layers=layers)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="skip connection goes around it"):  # inside a residual block
        load_backbone("resnet50", "none", target_layers=["conv5_block3_1_conv", "conv5_block3_out"])


def test_imagenet_weights_that_cannot_be_downloaded_are_a_one_line_error(monkeypatch, tmp_path, capsys):
    import keras.src.utils.file_utils as file_utils

    from camserve.export.__main__ import main

    def offline(origin: str, *args, **kwargs):  # what Keras raises when the download fails
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    argv = ["--backbone", "mobilenet_v2", "--model-name", "m", "--base-path", str(tmp_path)]
    assert main([*argv, "--weights", "imagenet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("export: error: --weights imagenet") and "--weights FILE" in error
    assert not (tmp_path / "m").exists()


def test_layer_names_starting_with_an_underscore_export_and_serve(tmp_path, monkeypatch):
    """Keras models converted from PyTorch keep its keys as layer names (`_blocks.12._project_conv`):
    a graph node may not start with "_", so saving failed. The export must save, TF Serving's loader
    must restore the right values, and the layers keep their names."""
    import keras

    import camserve.export.savedmodel as savedmodel
    from camserve.serving.servables.session import SavedModelSession

    keras.utils.set_random_seed(7)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="_blocks__12___project_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="_avg")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="_fc")(x))
    model.save(tmp_path / "underscored.keras")
    saved_variables = []
    rename = savedmodel.graph_safe_variable_names

    def recording(variables):
        saved_variables.extend(variables)
        return rename(variables)

    monkeypatch.setattr(savedmodel, "graph_safe_variable_names", recording)
    version = synthetic.export_model(tmp_path / "underscored.keras", ["gradcam", "cam"], "underscored",
                                     tmp_path / "models", warmup_batch_sizes=(1,), feature_maps=0)
    image = random_images(1, 32, 8)
    with SavedModelSession(version) as session:
        assert session.signature_defs["predict"].inputs["images"].dtype == tf.uint8.as_datatype_enum
        served = session.run_signature("predict", {"images": image}, ["logits"])["logits"]
    expected = model(image.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The saver's renaming is undone: the exported model's variables have their layers' names again.
    assert {v.name.split(":")[0] for v in saved_variables} >= {"_blocks__12___project_conv/kernel", "_fc/kernel"}
    reloaded = keras.models.load_model(tmp_path / "underscored.keras")
    assert reloaded.get_layer("_blocks__12___project_conv").kernel.shape == (3, 3, 3, 8)
