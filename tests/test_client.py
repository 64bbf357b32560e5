"""Tests of the thin client: wire compatibility with the official TF Serving protos, no TensorFlow
import, overlay geometry, CamClient and the CLI against an in-process fake PredictionService.

Set CAMSERVE_SERVER (and CAMSERVE_MODEL) to also run a smoke test against a real server.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

import synthetic
from calls import fake_server
from camserve.client import CamClient, CamServingError, Explanation, Prediction, protos
from camserve.client import overlay as ov
from camserve.client.__main__ import main as cli_main
from camserve.client.api import _parse, method_pictures

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".png", ".jpg"))
DEFAULT_FILTER = {"class_index", "class_label", "score", "top_k_indices", "top_k_scores", "top_k_labels",
                  "heatmap_png_bytes", "error"}


# -- wire compatibility ---------------------------------------------------------------------------
def test_request_bytes_parse_as_official_message():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    ours = protos.PredictRequest(output_filter=["heatmap_uint8", "top_k_labels"])
    ours.model_spec.name, ours.model_spec.signature_name = "m", "gradcam"
    ours.model_spec.version.value = 7
    ours.inputs["images"].CopyFrom(protos.make_tensor(images))
    ours.inputs["class_index"].CopyFrom(protos.make_tensor(np.array([-1, 3], np.int32)))
    ours.inputs["image_bytes"].CopyFrom(protos.make_tensor(np.array([b"\xff\xd8jpeg", b"png"], dtype=object)))

    theirs = predict_pb2.PredictRequest.FromString(ours.SerializeToString())
    expected = predict_pb2.PredictRequest(output_filter=["heatmap_uint8", "top_k_labels"])
    expected.model_spec.name, expected.model_spec.signature_name = "m", "gradcam"
    expected.model_spec.version.value = 7
    expected.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    expected.inputs["class_index"].CopyFrom(tf.make_tensor_proto(np.array([-1, 3], np.int32)))
    expected.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([b"\xff\xd8jpeg", b"png"]))
    assert theirs == expected
    assert theirs.inputs["images"].dtype == tf.uint8.as_datatype_enum
    np.testing.assert_array_equal(tf.make_ndarray(theirs.inputs["images"]), images)
    assert list(tf.make_ndarray(theirs.inputs["image_bytes"])) == [b"\xff\xd8jpeg", b"png"]


def test_official_response_parses_with_ours_both_encodings():
    rng = np.random.default_rng(1)
    arrays = {"probabilities": rng.random((2, 10), np.float32), "top_k_indices": np.array([[3, 1], [0, 2]], np.int32),
              "top_k_labels": np.array([[b"cat", b"dog"], [b"tench", b"ant"]], dtype=object),
              "heatmap_uint8": rng.integers(0, 256, (2, 4, 4), dtype=np.uint8),
              "logits": rng.standard_normal((2, 3)).astype(np.float64)}
    official = predict_pb2.PredictResponse()
    official.model_spec.name = "m"
    official.model_spec.version.value = 3
    for name, value in arrays.items():  # tensor_content encoding (tf.make_tensor_proto)
        official.outputs[name].CopyFrom(tf.make_tensor_proto(value))
    # typed-field encoding (TF Serving's AsProtoField), including the "repeat the last value" rule
    official.outputs["score"].dtype = tf.float32.as_datatype_enum
    official.outputs["score"].tensor_shape.dim.add(size=3)
    official.outputs["score"].float_val.extend([0.5, 2.0])
    official.outputs["class_index"].dtype = tf.int32.as_datatype_enum
    official.outputs["class_index"].tensor_shape.dim.add(size=2)
    official.outputs["class_index"].int_val.extend([7, -1])
    official.outputs["u8"].dtype = tf.uint8.as_datatype_enum
    official.outputs["u8"].tensor_shape.dim.add(size=2)
    official.outputs["u8"].int_val.extend([0, 255])
    official.outputs["half"].CopyFrom(tf.make_tensor_proto(np.array([1.5, -2.0], np.float16)))
    official.outputs["half"].ClearField("tensor_content")
    official.outputs["half"].half_val.extend(np.array([1.5, -2.0], np.float16).view(np.uint16).tolist())

    ours = protos.PredictResponse.FromString(official.SerializeToString())
    assert ours.model_spec.name == "m" and ours.model_spec.version.value == 3
    for name, value in arrays.items():
        got = protos.to_numpy(ours.outputs[name])
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert (got == value).all(), name
    np.testing.assert_array_equal(protos.to_numpy(ours.outputs["score"]), np.float32([0.5, 2.0, 2.0]))
    np.testing.assert_array_equal(protos.to_numpy(ours.outputs["class_index"]), np.int32([7, -1]))
    assert protos.to_numpy(ours.outputs["u8"]).dtype == np.uint8
    np.testing.assert_array_equal(protos.to_numpy(ours.outputs["half"]), np.float16([1.5, -2.0]))
    # and back: our re-serialisation is the same message for the official parser
    assert predict_pb2.PredictResponse.FromString(ours.SerializeToString()) == official


def test_metadata_response_parses_with_ours():
    sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    sig.inputs["images"].name = "serving_images:0"
    sig.inputs["images"].dtype = tf.uint8.as_datatype_enum
    for d in (-1, 224, 200, 3):
        sig.inputs["images"].tensor_shape.dim.add(size=d)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    sig_map.signature_def["gradcam"].CopyFrom(sig)
    official = get_model_metadata_pb2.GetModelMetadataResponse()
    official.metadata["signature_def"].Pack(sig_map)
    ours = protos.GetModelMetadataResponse.FromString(official.SerializeToString())
    any_msg = ours.metadata["signature_def"]
    assert any_msg.type_url.endswith("tensorflow.serving.SignatureDefMap")
    info = protos.SignatureDefMap.FromString(any_msg.value).signature_def["gradcam"].inputs["images"]
    assert [d.size for d in info.tensor_shape.dim] == [-1, 224, 200, 3] and info.dtype == protos.DT_UINT8


def test_a_methods_pictures_are_what_its_signature_declares():
    """A method with pictures of its own needs no client change: `method_pictures` finds its
    `<picture>_png_bytes` outputs in the metadata, and an answer's pictures decode into `.pictures` by name."""
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    declared = {"newcam_bytes": ["heatmap_png_bytes", "mask_png_bytes", "edges_png_bytes"],
                "gradcam_bytes": ["heatmap_png_bytes", "heatmap"], "predict_bytes": ["class_index"]}
    for name, outputs in declared.items():
        sig = sig_map.signature_def[name]
        for tensor in ("image_bytes", "class_index") if name != "predict_bytes" else ("image_bytes",):
            sig.inputs[tensor].name = f"{tensor}:0"
        for output in outputs:
            sig.outputs[output].name = f"{output}:0"
    signature_defs = protos.SignatureDefMap.FromString(sig_map.SerializeToString()).signature_def
    assert method_pictures(signature_defs) == {"gradcam": [], "newcam": ["edges_png_bytes", "mask_png_bytes"]}

    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    png = {name: cv2.imencode(".png", image)[1].tobytes()
           for name, image in {"heatmap": rgb[:, :, 0], "mask": rgb[:, :, ::-1], "edges": rgb[:, :, 1]}.items()}
    answer = {"class_index": np.int32(1), "class_label": b"b", "score": np.float32(2.0),
              "top_k_labels": np.array([b"b"], object), "top_k_scores": np.array([0.9], np.float32),
              **{f"{name}_png_bytes": data for name, data in png.items()}}
    result = _parse(answer, None, Explanation)
    assert sorted(result.pictures) == ["edges", "mask"] and np.array_equal(result.pictures["mask"], rgb)
    assert np.array_equal(result.pictures["edges"], np.repeat(rgb[:, :, 1:2], 3, axis=2))  # grey as RGB
    assert np.array_equal(np.round(result.heatmap * 255), rgb[:, :, 0])  # the heatmap is no picture


def test_make_tensor_rejects_unknown_dtype():
    with pytest.raises(TypeError):
        protos.make_tensor(np.zeros(2, np.complex64))


# -- thin: no TensorFlow --------------------------------------------------------------------------
_NO_TF = """
import sys, runpy
sys.argv = ["client", "explain", {image!r}, "--server", "127.0.0.1:9", "--timeout", "2", "--out", {out!r}]
try:
    runpy.run_module("client", run_name="__main__")
except SystemExit as e:
    code = e.code
import client.overlay
from google.protobuf import descriptor_pool
bad = sorted(m for m in sys.modules if m.startswith("tensorflow"))
print("CODE", code, "TF", bad)
try:
    descriptor_pool.Default().FindMessageTypeByName("tensorflow.TensorProto")
    print("DEFAULT_POOL_POLLUTED")
except KeyError:
    pass
"""


def test_client_and_cli_do_not_import_tensorflow(tmp_path):
    code = _NO_TF.format(image=str(SAMPLES[0]), out=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "TF []" in run.stdout, run.stdout + run.stderr
    assert "CODE 1" in run.stdout and "UNAVAILABLE" in run.stderr  # the CLI really ran and called gRPC
    assert "DEFAULT_POOL_POLLUTED" not in run.stdout


# -- overlay --------------------------------------------------------------------------------------
def test_overlay_keeps_original_size_and_places_heat():
    image = np.full((300, 451, 3), 100, np.uint8)
    heat = np.zeros((224, 224), np.float32)
    heat[:, :112] = 1.0  # hot left half
    blended = ov.overlay(image, heat, alpha=0.4)
    colored = ov.colorize(heat, (451, 300))
    assert blended.shape == image.shape and colored.shape == image.shape and blended.dtype == np.uint8
    # JET: 1.0 -> dark red (BGR 0,0,128), 0.0 -> dark blue (128,0,0)
    np.testing.assert_array_equal(colored[150, 10], [0, 0, 128])
    np.testing.assert_array_equal(colored[150, 440], [128, 0, 0])
    np.testing.assert_allclose(blended[150, 10], 0.4 * np.array([0, 0, 128]) + 0.6 * 100, atol=1)
    np.testing.assert_array_equal(ov.overlay(image, heat, alpha=0.0), image)
    with pytest.raises(ValueError):
        ov.overlay(image.astype(np.float32), heat)


def test_read_image_matches_cv2_and_rejects_garbage():
    path = next(p for p in SAMPLES if p.suffix == ".png")
    np.testing.assert_array_equal(ov.read_image(path), cv2.imread(str(path)))
    with pytest.raises(ValueError):
        ov.read_image(b"not an image")


# -- fake PredictionService -----------------------------------------------------------------------
LABELS = [f"class_{i}" for i in range(10)]
SIZE, K = (32, 40), 5
METHODS = ("gradcam", "cam")
PREDICTION_OUTPUTS = {"probabilities", "logits", "class_index", "class_label", "score", "top_k_indices", "error",
                      "top_k_scores", "top_k_labels", "padding"}
EXPLAIN_OUTPUTS = PREDICTION_OUTPUTS | {"heatmap", "heatmap_uint8", "heatmap_png_bytes", "heatmap_lowres"}


class FakePredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Follows the README contract and TF Serving's error codes; records what it receives. `explain`:
    whether the model has the explain signatures (a model exported before them has not)."""

    def __init__(self, explain: bool = True):
        self.requests: list = []
        self.busy = 0  # the next `busy` Predict calls are refused as an overloaded TF Serving refuses them
        self.signatures = [*METHODS, "predict", *(["explain"] if explain else [])]

    def _model(self, spec, context) -> None:
        if spec.name not in ("m", "slow"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")

    def GetModelMetadata(self, request, context):
        self.requests.append(request)
        self._model(request.model_spec, context)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name in self.signatures:
            for suffix, image_input in (("", "images"), ("_bytes", "image_bytes")):
                sig = sig_map.signature_def[name + suffix]
                for tensor in (image_input, *self._per_row(name)):
                    sig.inputs[tensor].name = f"{tensor}:0"
                if image_input == "images":
                    for d in (-1, *SIZE, 3):
                        sig.inputs["images"].tensor_shape.dim.add(size=d)
                for output in PREDICTION_OUTPUTS if name == "predict" else EXPLAIN_OUTPUTS:
                    sig.outputs[output].name = f"{output}:0"
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.metadata["signature_def"].Pack(sig_map)
        return response

    @staticmethod
    def _per_row(name: str) -> tuple[str, ...]:
        return {"predict": (), "explain": ("class_index", "method")}.get(name, ("class_index",))

    def Predict(self, request, context):
        self.requests.append(request)
        if self.busy:
            self.busy -= 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Server Threadpool Exhausted")
        spec = request.model_spec
        if spec.name == "slow":
            time.sleep(2)
        self._model(spec, context)
        sig = spec.signature_name
        base = sig.removesuffix("_bytes")
        if base not in self.signatures:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"Serving signature name: \"{sig}\" not found")
        needed = {"image_bytes" if sig.endswith("_bytes") else "images", *self._per_row(base)}
        if set(request.inputs) != needed:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected inputs {sorted(needed)}")
        if sig.endswith("_bytes"):
            blobs = tf.make_ndarray(request.inputs["image_bytes"])
            assert all(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) is not None for b in blobs)
            n = len(blobs)
        else:
            images = tf.make_ndarray(request.inputs["images"])
            if images.dtype != np.uint8 or images.shape[1:] != (*SIZE, 3):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images {images.dtype} {images.shape}")
            n = len(images)
        logits = np.tile(np.arange(10, dtype=np.float32), (n, 1))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        chosen = np.full(n, 9, np.int32)
        errors = np.array([b""] * n, dtype=object)
        methods = [base] * n
        if base == "explain":  # like the exported graph: a method the model lacks marks its row only
            methods = [m.decode() for m in tf.make_ndarray(request.inputs["method"])]
            errors = np.array([b"" if m in (*METHODS, "predict") else f"method '{m}' is not the model's".encode()
                               for m in methods], dtype=object)
        if base != "predict":  # like the exported graph: an out-of-range class marks its row only
            requested = tf.make_ndarray(request.inputs["class_index"])
            errors = np.array([f"class_index {c} is out of range".encode() if c >= 10 else e
                               for c, e in zip(requested, errors)], dtype=object)
            chosen = np.where((requested >= 0) & (requested < 10), requested, 9).astype(np.int32)
        top = np.argsort(-probs, 1)[:, :K].astype(np.int32)
        heat = np.tile(np.linspace(0, 1, SIZE[1], dtype=np.float32), (n, SIZE[0], 1))
        out = {"probabilities": probs, "logits": logits, "class_index": chosen,
               "class_label": np.array([LABELS[c].encode() for c in chosen], dtype=object),
               "score": logits[np.arange(n), chosen], "top_k_indices": top,
               "top_k_scores": np.take_along_axis(probs, top, 1),
               "top_k_labels": np.array([[LABELS[c].encode() for c in row] for row in top], dtype=object),
               "heatmap": heat, "heatmap_uint8": np.round(heat * 255).astype(np.uint8),
               "heatmap_png_bytes": np.array([cv2.imencode(".png", m)[1].tobytes()
                                        for m in np.round(heat * 255).astype(np.uint8)], dtype=object),
               "heatmap_lowres": heat[:, ::4, ::4], "padding": np.zeros((n, 6 * 1024 * 1024), np.uint8),
               "error": errors}
        out["heatmap_png_bytes"][[m == "predict" for m in methods]] = b""  # the prediction alone: no map
        if base == "predict":
            out = {k: v for k, v in out.items() if not k.startswith("heatmap")}
        names = list(request.output_filter) or list(out)
        unknown = [k for k in names if k not in out]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output tensor alias not found: {unknown}")
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(spec)
        for k in names:
            response.outputs[k].CopyFrom(tf.make_tensor_proto(out[k]))
        return response


@pytest.fixture(scope="module")
def fake():
    service = FakePredictionService()
    server, port = fake_server(service, options=[("grpc.max_send_message_length", 1 << 30)])
    service.address = f"127.0.0.1:{port}"
    yield service
    server.stop(None)


@pytest.fixture
def cam(fake):
    fake.requests.clear()
    with CamClient(fake.address, model="m", timeout=10) as client:
        yield client


def test_explain_path_sends_file_bytes_and_parses_response(cam, fake):
    result = cam.explain(str(SAMPLES[0]), method="gradcam", top_k=3)
    metadata, request = fake.requests  # the model's signatures, asked once per client
    assert request.model_spec.name == "m" and request.model_spec.signature_name == "explain_bytes"
    assert tf.make_ndarray(request.inputs["method"]).tolist() == [b"gradcam"]
    assert not request.model_spec.HasField("version")
    assert set(request.output_filter) == DEFAULT_FILTER
    assert request.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert list(tf.make_ndarray(request.inputs["image_bytes"])) == [SAMPLES[0].read_bytes()]  # not re-encoded
    assert request.inputs["class_index"].dtype == tf.int32.as_datatype_enum
    assert tf.make_ndarray(request.inputs["class_index"]).tolist() == [-1]
    assert isinstance(result, Explanation)
    assert result.class_index == 9 and result.class_label == "class_9" and result.score == 9.0
    assert [label for label, _ in result.top_k] == ["class_9", "class_8", "class_7"]
    assert result.top_k[0][1] == pytest.approx(np.exp(9) / np.exp(np.arange(10)).sum(), rel=1e-6)
    assert result.heatmap.dtype == np.float32 and result.heatmap.shape == SIZE
    assert result.heatmap.min() == 0.0 and result.heatmap.max() == 1.0
    np.testing.assert_allclose(result.heatmap[0], np.linspace(0, 1, SIZE[1]), atol=0.5 / 255 + 1e-6)


def test_explain_mixed_batch_keeps_order_and_sends_arrays_as_bmp(cam, fake):
    """Files and arrays go in one call of explain_bytes: an array as a BMP file, its pixels as they are
    (the server decodes and resizes it as any file)."""
    array = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    items = [SAMPLES[0].read_bytes(), array, SAMPLES[1]]
    results = cam.explain(items, method="cam", class_index=[1, 2, 3], heatmap="float")
    assert [r.class_index for r in results] == [1, 2, 3] and [r.class_label for r in results][1] == "class_2"
    (request,) = [r for r in fake.requests if isinstance(r, predict_pb2.PredictRequest)]
    assert request.model_spec.signature_name == "explain_bytes"
    assert tf.make_ndarray(request.inputs["class_index"]).tolist() == [1, 2, 3]
    assert tf.make_ndarray(request.inputs["method"]).tolist() == [b"cam"] * 3
    sent = tf.make_ndarray(request.inputs["image_bytes"])
    assert sent[1][:2] == b"BM" and np.array_equal(cv2.imdecode(np.frombuffer(sent[1], np.uint8), cv2.IMREAD_COLOR),
                                                   array[:, :, ::-1])
    assert "heatmap" in request.output_filter and "heatmap_uint8" not in request.output_filter
    np.testing.assert_array_equal(results[1].heatmap[0], np.linspace(0, 1, SIZE[1], dtype=np.float32))


def test_predict_asks_explain_bytes_for_the_prediction_alone(cam, fake):
    """A prediction is a row of explain_bytes with the method `predict` and the one output set of every
    call (so that it runs on the executor the server's warm-up built); its empty map is left out."""
    results = cam.predict([SAMPLES[0], SAMPLES[1]], top_k=2)
    metadata, request = fake.requests
    assert request.model_spec.signature_name == "explain_bytes"
    assert tf.make_ndarray(request.inputs["method"]).tolist() == [b"predict"] * 2
    assert set(request.output_filter) == DEFAULT_FILTER
    assert all(isinstance(r, Prediction) and not isinstance(r, Explanation) for r in results)
    assert [len(r.top_k) for r in results] == [2, 2]


def test_a_model_exported_without_explain_is_called_by_method_and_predict():
    service = FakePredictionService(explain=False)
    server, port = fake_server(service)
    try:
        with CamClient(f"127.0.0.1:{port}", model="m", timeout=10) as client:
            explained = client.explain(SAMPLES[0], method="cam")
            predicted = client.predict(SAMPLES[0])
    finally:
        server.stop(None)
    calls = [r for r in service.requests if isinstance(r, predict_pb2.PredictRequest)]
    assert [r.model_spec.signature_name for r in calls] == ["cam_bytes", "predict_bytes"]
    assert set(calls[1].inputs) == {"image_bytes"} and not any(o.startswith("heatmap") for o in calls[1].output_filter)
    assert explained.heatmap.shape == SIZE and predicted.class_index == 9


def test_version_batches_and_big_response(fake):
    with CamClient(fake.address, model="m", version=4, batch_size=2, image_size=SIZE) as client:
        fake.requests.clear()
        batch = np.zeros((5, *SIZE, 3), np.uint8)
        results = client.explain(batch, outputs=["padding"])  # 5 × 6 MiB: beyond gRPC's 4 MiB default
    assert len(results) == 5 and results[4].outputs["padding"].shape == (6 * 1024 * 1024,)
    calls = [r for r in fake.requests if isinstance(r, predict_pb2.PredictRequest)]
    assert [len(tf.make_ndarray(r.inputs["image_bytes"])) for r in calls] == [2, 2, 1]
    assert all(r.model_spec.version.value == 4 for r in fake.requests)


@pytest.mark.parametrize("model, kwargs, code", [
    ("nope", {}, grpc.StatusCode.NOT_FOUND),
    ("m", {"method": "gradcam_plus"}, grpc.StatusCode.FAILED_PRECONDITION),
    ("m", {"outputs": ["nonexistent"]}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_server_errors_become_cam_serving_error(fake, model, kwargs, code):
    with CamClient(fake.address, model=model, timeout=10) as client, pytest.raises(CamServingError) as info:
        client.explain(SAMPLES[0], **kwargs)
    assert info.value.code == code and info.value.details and code.name in str(info.value)


def test_a_refused_image_in_a_computed_batch_is_an_invalid_argument(cam, fake):
    """The server computes a batch even when one image is refused and says why in `error` (so that
    a batching TF Serving does not fail the other callers); the client raises for its own image."""
    with pytest.raises(CamServingError) as info:
        cam.explain([SAMPLES[0], SAMPLES[1]], class_index=[1, 12])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"image 1 ({SAMPLES[1]}): class_index 12 is out of range" in info.value.details
    assert "image 0" not in info.value.details


def test_an_overloaded_server_is_retried_by_the_channel(fake):
    """TF Serving past --grpc_max_threads answers RESOURCE_EXHAUSTED before running anything: the
    channel's throttled retry policy backs off and tries again (no retry layer of CamClient's)."""
    with CamClient(fake.address, model="m", timeout=10) as client:
        client.explain(SAMPLES[0])  # a success first: the retry throttle starts full
        fake.requests.clear()
        fake.busy = 2
        assert client.explain(SAMPLES[0]).class_index == 9
        assert len(fake.requests) == 3 and fake.busy == 0
        fake.busy = 10  # still overloaded after gRPC's 5 attempts: the caller gets the status
        with pytest.raises(CamServingError) as info:
            client.explain(SAMPLES[0])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        fake.busy = 0


def test_deadline_and_bad_inputs(fake):
    with CamClient(fake.address, model="slow", timeout=0.3) as client, pytest.raises(CamServingError) as info:
        client.explain(SAMPLES[0])
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "0.3" in str(info.value)
    with CamClient(fake.address, model="m") as client:
        with pytest.raises(ValueError, match="uint8"):
            client.explain(np.zeros((*SIZE, 3), np.float32))
        with pytest.raises(ValueError, match="class indices"):
            client.explain([SAMPLES[0], SAMPLES[1]], class_index=[1])
        with pytest.raises(TypeError):
            client.explain(12345)


# -- command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [False, True])
def test_cli_explain_writes_pngs_at_original_size(fake, tmp_path, capsys, raw):
    args = ["explain", *map(str, SAMPLES), "--server", fake.address, "--model", "m", "--out", str(tmp_path),
            "--top-k", "3", "--method", "gradcam"] + (["--raw"] if raw else [])
    fake.requests.clear()
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    for sample in SAMPLES:
        original = cv2.imread(str(sample))
        for kind in ("overlay", "heatmap"):
            written = cv2.imread(str(tmp_path / f"{sample.stem}_gradcam_{kind}.png"))
            assert written is not None and written.shape == original.shape, (sample, kind)
        assert f"{sample}: gradcam class 9 class_9" in printed
    assert printed.count("   1. class_9 ") == len(SAMPLES) and "   4. " not in printed
    calls = [r for r in fake.requests if isinstance(r, predict_pb2.PredictRequest)]
    assert {r.model_spec.signature_name for r in calls} == {"explain_bytes"}
    sent = [blob for r in calls for blob in tf.make_ndarray(r.inputs["image_bytes"])]
    assert all(blob[:2] == b"BM" for blob in sent) if raw else sent == [s.read_bytes() for s in SAMPLES]


def test_cli_predict_and_error_exit_codes(fake, capsys):
    assert cli_main(["predict", str(SAMPLES[0]), "--server", fake.address, "--model", "m"]) == 0
    assert "   5. class_5" in capsys.readouterr().out
    assert cli_main(["predict", str(SAMPLES[0]), "--server", fake.address, "--model", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli_main(["explain", "/no/such.jpg", "--server", fake.address, "--model", "m"]) == 2


# -- optional: a real TF Serving or embedded server ------------------------------------------------
@pytest.mark.skipif(not os.environ.get("CAMSERVE_SERVER"), reason="set CAMSERVE_SERVER=host:port to run")
def test_live_server_explains_samples():
    model = os.environ.get("CAMSERVE_MODEL", "efficientnet_lite0_cam")
    with CamClient(os.environ["CAMSERVE_SERVER"], model=model) as client:
        results = client.explain([str(p) for p in SAMPLES])
        raw = client.explain(ov.read_image(SAMPLES[0])[:, :, ::-1].copy())
    for r in results + [raw]:
        assert r.heatmap.ndim == 2 and 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0 and r.top_k


# -- end to end: the embedded server (serving/) hosting a real export -------------------------------
E2E_SIZE = 48


@pytest.fixture(scope="module")
def served_tiny(tmp_path_factory):
    """A tiny random GAP + dense CNN exported by export/ and hosted by `python -m serving`."""
    if not (ROOT / "serving" / "__main__.py").exists():
        pytest.skip("serving/ has no __main__ yet")
    import socket

    import keras


    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = tmp_path_factory.mktemp("e2e") / "tiny"
    base.mkdir()
    # Start the server first: it polls for the version the export renames into place meanwhile.
    log = open(base.parent / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--port", str(port), "--model_name", base.name,
                             "--model_base_path", str(base), "--file_system_poll_wait_seconds", "1"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        keras.utils.set_random_seed(3)
        inputs = keras.Input((E2E_SIZE, E2E_SIZE, 3))
        x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
        x = keras.layers.Conv2D(16, 3, activation="relu", name="features")(x)
        outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
        keras.Model(inputs, outputs).save(base.parent / "tiny.keras")
        synthetic.export_model(base.parent / "tiny.keras", ["gradcam", "cam", "guided_gradcam"], base.name, base.parent,
                               warmup_batch_sizes=(1,))
        address, deadline = f"127.0.0.1:{port}", time.monotonic() + 120
        with CamClient(address, model=base.name, timeout=5) as client:
            while True:
                try:
                    client.predict(np.zeros((E2E_SIZE, E2E_SIZE, 3), np.uint8))
                    break
                except CamServingError as err:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = (base.parent / "server.log").read_text()[-2000:]
                        pytest.fail(f"server did not come up ({err}): {tail}")
                    time.sleep(0.5)
        yield address, base.name
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_end_to_end_with_embedded_server(served_tiny, tmp_path):
    address, model = served_tiny
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)  # RGB, not the model size
    path = tmp_path / "noise.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    with CamClient(address, model=model) as client:
        by_bytes = client.explain(path, method="gradcam")
        by_array = client.explain(image, method="gradcam", heatmap="float", outputs=["heatmap_lowres"])
        cam = client.explain([path, path.read_bytes()], method="cam", class_index=[by_bytes.class_index, 2])
        with pytest.raises(CamServingError) as info:
            client.explain(path, class_index=4)  # 4 classes: out of range
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert by_bytes.heatmap.shape == by_array.heatmap.shape == (E2E_SIZE, E2E_SIZE)
    assert 0.0 <= by_bytes.heatmap.min() and by_bytes.heatmap.max() <= 1.0
    assert by_array.outputs["heatmap_lowres"].max() == 1.0  # normalised before the resize
    assert by_array.outputs["heatmap_lowres"].ndim == 2 and len(by_bytes.top_k) == 4
    assert by_bytes.top_k[0][0] == by_bytes.class_label == f"class_{by_bytes.class_index}"
    assert [c.class_index for c in cam] == [by_bytes.class_index, 2]
    np.testing.assert_allclose(cam[0].heatmap, by_bytes.heatmap, atol=2 / 255)  # GAP + dense: CAM == Grad-CAM
    assert cli_main(["explain", str(path), "--server", address, "--model", model, "--out", str(tmp_path)]) == 0
    for kind in ("overlay", "heatmap"):
        assert cv2.imread(str(tmp_path / f"noise_gradcam_{kind}.png")).shape == (100, 150, 3)
    # Guided Grad-CAM: its picture too, at the photo's size
    assert (
        cli_main(
            ["explain", str(path), "--server", address, "--model", model, "--out", str(tmp_path), "--method",
             "guided_gradcam"]
        )
        == 0
    )
    assert cv2.imread(str(tmp_path / "noise_guided_gradcam_guided.png")).shape == (100, 150, 3)
