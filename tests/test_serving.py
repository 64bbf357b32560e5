"""The embedded server answers TF Serving's gRPC API like TF Serving, through the official stubs.

A tiny GAP CNN is exported twice (version 1 with gradcam and cam, version 2 with gradcam only, so
that a pinned version is visibly the one that answered) and served by an in-process
`EmbeddedServer`; a `python -m serving` subprocess with batching covers the command line,
concurrency and SIGTERM. With TFSERVING_ADDRESS=host:port the protocol tests target that server
instead (model TFSERVING_MODEL, default efficientnet_lite0_cam; set TFSERVING_MODEL_DIR to the served
version's directory to compare heatmaps with an in-process call); tests that need the local
process are skipped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

import synthetic
from calls import arrays, predict_request, rpc_error, wait_for
from camserve.serving import configs
from camserve.serving.__main__ import options_from_args, parser
from camserve.serving.batching import Batcher
from camserve.serving.errors import ServingError, clean_tf_message
from camserve.serving.registry import ModelRegistry
from camserve.serving.servables.session import SessionError
from camserve.serving.servables.warmup import WARMUP_FILE
from camserve.serving.server import EmbeddedServer, ServerOptions, default_grpc_threads
from camserve.serving.tensors import encode_tensor
from images import png, random_images
from servers import ServerProcess, from_flags
from tf2 import TF2

ROOT = pathlib.Path(__file__).resolve().parent.parent
REMOTE = os.environ.get("TFSERVING_ADDRESS")
local_only = pytest.mark.skipif(bool(REMOTE), reason="needs the embedded server of this test process")

SIZE = 32
NUM_CLASSES = 5
PREDICT_OUTPUTS = {"probabilities", "logits", "class_index", "class_label", "score",
                   "top_k_indices", "top_k_scores", "top_k_labels", "error"}
EXPLAIN_OUTPUTS = PREDICT_OUTPUTS | {"heatmap", "heatmap_uint8", "heatmap_png_bytes", "heatmap_lowres"}
RECEIVE_LIMIT = 64 * 2**20


# --- models and servers ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> pathlib.Path:
    """<base>/tiny/1 (gradcam, cam) and <base>/tiny/2 (gradcam only) of one tiny GAP CNN."""
    base = tmp_path_factory.mktemp("serving") / "models" / "tiny"
    base.parent.mkdir()
    for version, methods in ((1, ("gradcam", "cam")), (2, ("gradcam",))):
        synthetic.export_tiny(base, version, methods, classes=NUM_CLASSES, warmup_batch_sizes=(1, 8), feature_maps=36)
    return base


def _write_model_config(path: pathlib.Path, models: dict[str, pathlib.Path]) -> pathlib.Path:
    config = configs.ModelServerConfig()
    for name, base_path in models.items():
        model = config.model_config_list.config.add(name=name, base_path=str(base_path), model_platform="tensorflow")
        model.model_version_policy.all.SetInParent()
        model.version_labels["stable"] = 1
    path.write_text(str(config))
    return path


@pytest.fixture(scope="session")
def batching_process(tiny_models, tmp_path_factory):
    """A subprocess server with batching; started early (see `local_server`) to overlap its start-up."""
    if REMOTE:
        pytest.skip("needs a local server process")
    root = tmp_path_factory.mktemp("batching")
    model_config = _write_model_config(root / "models.config", {"tiny": tiny_models})
    # A long batch window makes grouping (and requests in flight at SIGTERM) deterministic.
    (root / "batching.config").write_text(
        "max_batch_size { value: 8 }\nallowed_batch_sizes: 1\nallowed_batch_sizes: 8\n"
        "batch_timeout_micros { value: 300000 }\nnum_batch_threads { value: 1 }\nmax_enqueued_batches { value: 4 }\n"
    )
    server = ServerProcess(
        ["--port", "0", "--model_config_file", str(model_config), "--enable_batching",
         f"--batching_parameters_file={root / 'batching.config'}", "--file_system_poll_wait_seconds=0"]
    )
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def polled_base(tiny_models, tmp_path_factory) -> pathlib.Path:
    """A base path holding one version (a copy of tiny/2); a test adds version 2 while serving."""
    base = tmp_path_factory.mktemp("polled")
    shutil.copytree(tiny_models / "2", base / "1")
    return base


@pytest.fixture(scope="session")
def local_server(request):
    if REMOTE:
        yield None
        return
    tiny_models, polled_base = request.getfixturevalue("tiny_models"), request.getfixturevalue("polled_base")
    request.getfixturevalue("batching_process")  # start the subprocess now: it loads while we test
    config = configs.ModelServerConfig()
    for name, base_path in {"tiny": tiny_models, "polled": polled_base}.items():
        model = config.model_config_list.config.add(name=name, base_path=str(base_path), model_platform="tensorflow")
        if name == "tiny":
            model.model_version_policy.all.SetInParent()
            model.version_labels["stable"] = 1
    server = EmbeddedServer(config, ServerOptions(host="127.0.0.1", port=0, file_system_poll_wait_seconds=0.3))
    server.start()
    yield server
    server.stop(grace=1)


@dataclasses.dataclass
class Target:
    address: str
    model: str
    local: bool
    version: int  # the latest served version
    image_size: int
    num_classes: int
    reference_dir: pathlib.Path | None  # the served version's SavedModel, for in-process calls


@pytest.fixture(scope="session")
def target(local_server, request) -> Target:
    if not REMOTE:
        served = request.getfixturevalue("tiny_models") / "2"
        return Target(f"127.0.0.1:{local_server.port}", "tiny", True, 2, SIZE, NUM_CLASSES, served)
    model = os.environ.get("TFSERVING_MODEL", "efficientnet_lite0_cam")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(REMOTE))
    metadata = _metadata(stub, model)
    gradcam = metadata["gradcam"]
    size = gradcam.inputs["images"].tensor_shape.dim[1].size
    classes = gradcam.outputs["logits"].tensor_shape.dim[1].size
    version = _status(model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(REMOTE)), model)[-1]
    reference = os.environ.get("TFSERVING_MODEL_DIR")
    return Target(REMOTE, model, False, version, size, classes, pathlib.Path(reference) if reference else None)


@pytest.fixture(scope="session")
def channel(target):
    with grpc.insecure_channel(target.address, options=[("grpc.max_receive_message_length", RECEIVE_LIMIT)]) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="session")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="session")
def reference():
    """In-process signature calls on a SavedModel directory: what the server must reproduce."""
    cache = {}

    def call(path: pathlib.Path, signature: str, **inputs):
        if path not in cache:
            cache[path] = TF2(path)
        return {k: v.numpy() for k, v in cache[path].signatures[signature](**inputs).items()}

    return call


# --- helpers ---------------------------------------------------------------------------------


def explain_inputs(target: Target | None, n: int = 2, class_index=None, seed: int = 0) -> dict:
    """`n` random images for `target` (None: the local tiny model) and their class_index."""
    class_index = [-1] * n if class_index is None else class_index
    size = target.image_size if target else SIZE
    return {"images": random_images(n, size, seed), "class_index": np.array(class_index, np.int32)}


def _metadata(stub, model: str, version: int | None = None) -> dict:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    response = stub.GetModelMetadata(request, timeout=30)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_defs)
    return dict(signature_defs.signature_def)


def _status(model_stub, model: str, version: int | None = None) -> list[int]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    response = model_stub.GetModelStatus(request, timeout=30)
    return sorted(
        s.version for s in response.model_version_status if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    )


# --- Predict ---------------------------------------------------------------------------------


def test_predict_round_trip(stub, target):
    response = stub.Predict(
        predict_request(target.model, "predict", {"images": random_images(3, target.image_size, 0)}), timeout=60
    )
    out = arrays(response)
    assert set(out) == PREDICT_OUTPUTS
    assert response.model_spec.name == target.model
    assert response.model_spec.signature_name == "predict"
    assert response.model_spec.version.value == target.version
    assert out["probabilities"].shape == (3, target.num_classes)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(out["class_index"], out["logits"].argmax(axis=1))
    assert out["class_label"].dtype == object and all(isinstance(x, bytes) for x in out["class_label"])
    np.testing.assert_array_equal(out["top_k_indices"][:, 0], out["class_index"])


def test_gradcam_heatmap_equals_in_process_call(stub, target, reference):
    if target.reference_dir is None:
        pytest.skip("set TFSERVING_MODEL_DIR to the served version's directory")
    inputs = explain_inputs(target, 3, [-1, 1, 0])
    response = stub.Predict(predict_request(target.model, "gradcam", inputs), timeout=60)
    out = arrays(response)
    assert set(out) == EXPLAIN_OUTPUTS
    expected = reference(target.reference_dir, "gradcam", **inputs)
    assert out["heatmap"].shape == (3, target.image_size, target.image_size)
    np.testing.assert_allclose(out["heatmap"], expected["heatmap"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["heatmap_lowres"], expected["heatmap_lowres"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["heatmap_uint8"], expected["heatmap_uint8"])
    np.testing.assert_array_equal(out["class_index"], [expected["class_index"][0], 1, 0])
    assert out["heatmap"].max() > 0  # a real map, not an all-zero placeholder


def test_default_signature_takes_image_bytes(stub, target, reference):
    encoded = np.array([png(image) for image in random_images(2, target.image_size, 5)], dtype=object)
    inputs = {"image_bytes": encoded, "class_index": np.array([-1, 0], np.int32)}
    response = stub.Predict(predict_request(target.model, "", inputs), timeout=60)
    assert response.model_spec.signature_name == "serving_default"
    out = arrays(response)
    assert out["heatmap"].shape == (2, target.image_size, target.image_size)
    if target.reference_dir is not None:
        expected = reference(target.reference_dir, "serving_default", **inputs)
        np.testing.assert_allclose(out["heatmap"], expected["heatmap"], rtol=1e-5, atol=1e-6)


def test_outputs_are_in_typed_fields_like_tf_serving(stub, target):
    """TF Serving's default encoding: values in float_val / int_val / string_val, no tensor_content."""
    response = stub.Predict(predict_request(target.model, "gradcam", explain_inputs(target, 2)), timeout=60)
    heatmap = response.outputs["heatmap"]
    assert heatmap.tensor_content == b""
    assert len(heatmap.float_val) == 2 * target.image_size**2
    assert len(response.outputs["heatmap_uint8"].int_val) == 2 * target.image_size**2
    assert len(response.outputs["class_label"].string_val) == 2


def test_output_filter_returns_only_the_named_outputs(stub, target):
    inputs = explain_inputs(target, 2, [1, -1])
    full = arrays(stub.Predict(predict_request(target.model, "gradcam", inputs), timeout=60))
    wanted = ["heatmap_uint8", "top_k_labels"]
    response = stub.Predict(predict_request(target.model, "gradcam", inputs, output_filter=wanted), timeout=60)
    out = arrays(response)
    assert set(out) == set(wanted)
    for name in wanted:
        np.testing.assert_array_equal(out[name], full[name])


def test_output_filter_keeps_the_graph_checks(stub, target):
    """Pruning to cheap outputs must not drop the class_index range assertion."""
    request = predict_request(
        target.model, "gradcam", explain_inputs(target, 1, [target.num_classes]), output_filter=["top_k_labels"]
    )
    error = rpc_error(stub.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "class_index" in error.details()


def _bad_requests(target: Target) -> dict:
    """name: (request, status code, substrings the embedded server's message must contain)."""
    good = explain_inputs(target, 2)
    n, s = 2, target.image_size
    wrong_length = tf.make_tensor_proto(good["images"])
    wrong_length.tensor_content = wrong_length.tensor_content[:-5]
    return {
        "unknown model": (
            predict_request("no_such_model", "gradcam", good),
            grpc.StatusCode.NOT_FOUND,
            ["no_such_model"],
        ),
        "unknown version": (
            predict_request(target.model, "gradcam", good, version=999),
            grpc.StatusCode.NOT_FOUND,
            ["999"],
        ),
        "unknown signature": (
            predict_request(target.model, "no_such_signature", good),
            grpc.StatusCode.FAILED_PRECONDITION,
            ["no_such_signature"],
        ),
        "missing input": (
            predict_request(target.model, "gradcam", {"images": good["images"]}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["Missing but required: {class_index}"],
        ),
        "extra input": (
            predict_request(target.model, "gradcam", {**good, "extra": np.zeros(n, np.int32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["Sent extra: {extra}"],
        ),
        "bad dtype": (
            predict_request(target.model, "gradcam", {**good, "images": good["images"].astype(np.float32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'images'", "expected dtype uint8, got float32"],
        ),
        "bad shape": (
            predict_request(target.model, "gradcam", {**good, "images": random_images(n, s + 1, 0)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            [f"images: expected shape [N,{s},{s},3]", f"got [{n},{s + 1},{s + 1},3]"],
        ),
        "batch sizes differ": (
            predict_request(target.model, "gradcam", {**good, "class_index": np.zeros(n + 1, np.int32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["class_index needs one entry per image: 2 images, class_index of shape [3]"],
        ),
        "truncated tensor_content": (
            predict_request(target.model, "gradcam", {**good, "images": wrong_length}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'images'", "tensor_content"],
        ),
        "unknown output_filter": (
            predict_request(target.model, "gradcam", good, output_filter=["heatmap", "nope"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["nope"],
        ),
        "class_index out of range": (
            predict_request(target.model, "gradcam", explain_inputs(target, 2, [target.num_classes] * 2)),
            grpc.StatusCode.INVALID_ARGUMENT,
            [f"class_index {target.num_classes} is out of range"],
        ),
        "class_index below -1": (
            predict_request(target.model, "gradcam", explain_inputs(target, 2, [-2, -3])),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["class_index -2 is out of range", "class_index -3"],
        ),
        "corrupt image bytes": (
            predict_request(target.model, "predict_bytes", {"image_bytes": np.array([b"not an image"], object)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["image_bytes: not a JPEG, PNG or BMP image"],
        ),
        "truncated image": (
            predict_request(
                target.model, "predict_bytes", {"image_bytes": np.array([png(random_images(1, s, 0)[0])[:60]], object)}
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["image_bytes: the image cannot be decoded"],
        ),
    }


BAD_REQUESTS = ["unknown model", "unknown version", "unknown signature", "missing input", "extra input", "bad dtype",
                "bad shape", "batch sizes differ", "truncated tensor_content", "unknown output_filter",
                "class_index out of range", "class_index below -1", "corrupt image bytes", "truncated image"]


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_tf_serving_status(stub, target, case):
    request, code, fragments = _bad_requests(target)[case]
    error = rpc_error(stub.Predict, request)
    assert error.code() == code, error.details()
    if target.local:  # TF Serving's own wording differs; ours must be readable and name the culprit
        for fragment in fragments:
            assert fragment in error.details()
        assert "[[{{" not in error.details() and "Graph execution error" not in error.details()
        assert len(error.details()) < 600


def test_server_keeps_serving_after_errors(stub, target):
    for case in ("bad dtype", "class_index out of range", "corrupt image bytes"):
        rpc_error(stub.Predict, _bad_requests(target)[case][0])
    assert stub.Predict(
        predict_request(target.model, "predict", {"images": random_images(1, target.image_size, 0)}), timeout=60
    )


def test_messages_over_4_mib_are_accepted(stub, target):
    big = np.random.default_rng(1).integers(0, 256, size=(1300, 1300, 3), dtype=np.uint8)
    encoded = png(big)
    assert len(encoded) > 4 * 2**20
    request = predict_request(target.model, "predict_bytes", {"image_bytes": np.array([encoded], object)})
    out = arrays(stub.Predict(request, timeout=120))
    assert out["probabilities"].shape == (1, target.num_classes)


class _FailingSession:
    """Stands in for a version's session: every Session::Run fails with `error`."""

    def __init__(self, error: Exception):
        self.error = error

    def run(self, feeds, fetches):
        raise self.error


@local_only
@pytest.mark.parametrize(
    "error, code",
    [(SessionError(8, "OOM when allocating tensor with shape[8,2048]"), grpc.StatusCode.RESOURCE_EXHAUSTED),
     (SessionError(9, "Could not find variable dense/kernel"), grpc.StatusCode.FAILED_PRECONDITION),
     (SessionError(11, "End of sequence"), grpc.StatusCode.OUT_OF_RANGE),
     (SessionError(12, "No registered kernel"), grpc.StatusCode.UNIMPLEMENTED),
     (RuntimeError("something unexpected"), grpc.StatusCode.INTERNAL)],
)
def test_runtime_failures_keep_tensorflow_status(stub, target, local_server, monkeypatch, caplog, error, code):
    """TensorFlow's own status codes come back as they are (they are gRPC's); only our own bugs are INTERNAL."""
    signature = local_server.registry.resolve(predict_request("tiny", "predict", {}).model_spec).signature("predict")
    monkeypatch.setattr(signature, "_session", _FailingSession(error))
    with caplog.at_level("ERROR", logger="serving.server"):
        failure = rpc_error(
            stub.Predict, predict_request(target.model, "predict", {"images": random_images(1, SIZE, 0)})
        )
    assert failure.code() == code
    assert (error.message if isinstance(error, SessionError) else str(error)) in failure.details()
    if code == grpc.StatusCode.INTERNAL:
        assert any("Predict failed" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert stub.Predict(predict_request(target.model, "predict", {"images": random_images(1, SIZE, 0)}), timeout=60)


# --- metadata and status ---------------------------------------------------------------------


def test_metadata_lists_the_signatures(stub, target):
    signatures = _metadata(stub, target.model)
    assert {"predict", "predict_bytes", "gradcam", "gradcam_bytes", "serving_default"} <= set(signatures)
    gradcam = signatures["gradcam"]
    assert gradcam.method_name == "tensorflow/serving/predict"
    assert gradcam.inputs["images"].dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in gradcam.inputs["images"].tensor_shape.dim] == [-1, target.image_size, target.image_size, 3]
    assert gradcam.inputs["class_index"].dtype == tf.int32.as_datatype_enum
    assert set(gradcam.outputs) == EXPLAIN_OUTPUTS
    assert signatures["serving_default"].inputs["image_bytes"].dtype == tf.string.as_datatype_enum


def test_metadata_errors(stub, target):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = target.model
    assert rpc_error(stub.GetModelMetadata, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    request.metadata_field.append("signature_def")
    request.model_spec.name = "no_such_model"
    assert rpc_error(stub.GetModelMetadata, request).code() == grpc.StatusCode.NOT_FOUND


def test_model_status(model_stub, target):
    assert target.version in _status(model_stub, target.model)
    assert _status(model_stub, target.model, target.version) == [target.version]
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "no_such_model"
    assert rpc_error(model_stub.GetModelStatus, request).code() == grpc.StatusCode.NOT_FOUND
    request.model_spec.name = target.model
    request.model_spec.version.value = 999
    assert rpc_error(model_stub.GetModelStatus, request).code() == grpc.StatusCode.NOT_FOUND


# --- versions --------------------------------------------------------------------------------


@local_only
def test_version_pinning(stub, model_stub, target, tiny_models, reference):
    assert _status(model_stub, "tiny") == [1, 2]
    inputs = explain_inputs(target, 2, [2, -1], seed=7)
    # Only version 1 has "cam": the pinned version really is the one that runs.
    pinned = stub.Predict(predict_request("tiny", "cam", inputs, version=1), timeout=60)
    assert pinned.model_spec.version.value == 1
    np.testing.assert_allclose(
        arrays(pinned)["heatmap"], reference(tiny_models / "1", "cam", **inputs)["heatmap"], rtol=1e-5, atol=1e-6
    )
    for version in (None, 2):
        error = rpc_error(stub.Predict, predict_request("tiny", "cam", inputs, version=version))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.Predict(predict_request("tiny", "gradcam", inputs), timeout=60).model_spec.version.value == 2
    labelled = stub.Predict(predict_request("tiny", "cam", inputs, label="stable"), timeout=60)
    assert labelled.model_spec.version.value == 1
    error = rpc_error(stub.Predict, predict_request("tiny", "cam", inputs, label="no_such_label"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(_metadata(stub, "tiny", 1)) > set(_metadata(stub, "tiny", 2))  # v2 lacks cam, cam_bytes


@local_only
def test_new_version_is_picked_up_and_the_old_one_unloaded(model_stub, stub, polled_base, tiny_models):
    assert _status(model_stub, "polled") == [1]
    staging = polled_base / ".2-staging"  # the exporter's way: complete first, then rename
    shutil.copytree(tiny_models / "2", staging)
    os.rename(staging, polled_base / "2")
    deadline = time.monotonic() + 30
    while _status(model_stub, "polled") != [2] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _status(model_stub, "polled") == [2]
    response = stub.Predict(predict_request("polled", "predict", {"images": random_images(1, SIZE, 0)}), timeout=60)
    assert response.model_spec.version.value == 2


@local_only
def test_a_version_whose_warmup_fails_is_not_served(tiny_models, tmp_path, caplog):
    """As in TF Serving: a version that cannot answer its own warm-up requests is not loaded."""
    shutil.copytree(tiny_models / "2", tmp_path / "1")
    bad = predict_request("", "predict", {"images": random_images(1, SIZE + 1, 0)})  # wrong image size
    with tf.io.TFRecordWriter(str(tmp_path / "1" / WARMUP_FILE)) as writer:
        writer.write(
            prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=bad)).SerializeToString()
        )
    registry = ModelRegistry(configs.single_model_config("broken", str(tmp_path)))
    with caplog.at_level("ERROR", logger="serving.registry"):
        registry.sync()
    assert any(
        "failed to load model broken version 1" in r.getMessage()
        and f"images: expected shape [N,{SIZE},{SIZE},3]" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(ServingError) as missing:
        registry.resolve(predict_request("broken", "predict", {}).model_spec)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


# --- the command line, batching, SIGTERM (subprocess) ----------------------------------------


def test_command_line_flag_forms():
    p = parser()
    config, options = options_from_args(
        p.parse_args(
            ["--port=9000", "--model_name", "m", "--model_base_path=/x/m", "--enable_batching", "--grpc_max_threads",
             "3", "--enable_model_warmup=false", "--host", "0.0.0.0"]
        ),
        p,
    )
    assert options.port == 9000 and options.host == "0.0.0.0" and options.grpc_max_threads == 3
    assert options.batching == configs.BatchingOptions() and options.enable_model_warmup is False
    assert [(m.name, m.base_path) for m in config.model_config_list.config] == [("m", "/x/m")]
    config, options = options_from_args(
        p.parse_args(
            ["--model_config_file", str(ROOT / "serving" / "models.config"), "--enable_batching=true",
             "--batching_parameters_file", str(ROOT / "serving" / "batching.config"), "--models_root=/srv/m"]
        ),
        p,
    )
    assert options.batching.allowed_batch_sizes == (1, 8) and options.host == "127.0.0.1" and options.port == 8500
    if not os.path.isdir("/models"):  # the container path of models.config, read from --models_root here
        assert config.model_config_list.config[0].base_path == "/srv/m/efficientnet_lite0_cam"
    for bad in (
        ["--model_base_path=/x", "--model_config_file=/y"],
        [],
        ["--model_base_path=/x", "--no_such_flag=1"],
        ["--model_base_path=/x", "--batching_parameters_file=/b"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            options_from_args(p.parse_args(bad), p)
        assert exit_info.value.code == 2


@local_only
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_an_ssl_config_file(tiny_models, tmp_path):
    """Server-side TLS only (no client certificates), with `make certs`' CA and server certificate."""
    from camserve.serving.certs import make_ca, make_certificate

    make_ca(tmp_path)
    make_certificate(tmp_path, "server", server=True)
    ssl = configs.SSLConfig(server_key=(tmp_path / "server.key").read_text(),
                            server_cert=(tmp_path / "server.pem").read_text())
    (tmp_path / "ssl.config").write_text(text_format.MessageToString(ssl))
    cert = (tmp_path / "ca.pem").read_bytes()
    server = from_flags("--port=0", "--model_name=tiny", f"--model_base_path={tiny_models}",
                        f"--ssl_config_file={tmp_path / 'ssl.config'}", "--enable_model_warmup=false",
                        "--file_system_poll_wait_seconds=0")
    port = server.start()
    try:
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=cert)) as secure:
            assert _status(model_service_pb2_grpc.ModelServiceStub(secure), "tiny") == [2]
        with grpc.insecure_channel(f"localhost:{port}") as plain:
            error = rpc_error(
                model_service_pb2_grpc.ModelServiceStub(plain).GetModelStatus,
                get_model_status_pb2.GetModelStatusRequest(),
                timeout=5,
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=1)


@local_only
def test_subprocess_server_batches_concurrent_requests(batching_process, tiny_models, reference):
    address = batching_process.wait_ready()
    for version in (1, 2):  # one log line per version, after replaying its warm-up records
        assert re.search(rf"loaded model tiny version {version} .*; [1-9]\d* warm-up requests", batching_process.log)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))
    batch = random_images(6, SIZE, 11)
    classes = np.array([-1, 0, 1, 2, 3, 4], np.int32)
    expected = reference(tiny_models / "2", "gradcam", images=batch, class_index=classes)

    def one(i: int):
        request = predict_request("tiny", "gradcam", {"images": batch[i : i + 1], "class_index": classes[i : i + 1]})
        return arrays(stub.Predict(request, timeout=60))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(6)))
    for i, out in enumerate(results):
        np.testing.assert_allclose(out["heatmap"][0], expected["heatmap"][i], rtol=1e-5, atol=1e-6)
        assert out["class_index"][0] == expected["class_index"][i]
    too_many = rpc_error(stub.Predict, predict_request("tiny", "gradcam", explain_inputs(None, 9)))
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "larger than maximum input batch size 8" in too_many.details()


@local_only
def test_sigterm_finishes_in_flight_requests_and_exits_0(batching_process):
    address = batching_process.wait_ready()
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))
    request = predict_request("tiny", "predict", {"images": random_images(1, SIZE, 0)})
    stub.Predict(request, timeout=60)  # connected: the next requests reach the server at once
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stub.Predict, request, timeout=60) for _ in range(3)]
        time.sleep(0.15)  # in the 300 ms batch window: in flight, not answered yet
        assert not any(f.done() for f in futures)
        batching_process.proc.send_signal(signal.SIGTERM)
        for future in futures:
            assert future.result().outputs["probabilities"].tensor_shape.dim[0].size == 1
    assert batching_process.proc.wait(timeout=60) == 0
    assert "SIGTERM received" in batching_process.log


@local_only
def test_default_grpc_threads_let_batches_fill(tiny_models):
    # A request waiting in the batch queue holds a gRPC worker thread: with TF Serving's 4 per CPU
    # alone (4 on one CPU), 8 concurrent requests would go out as two batches of 4 after the timeout.
    batching = configs.BatchingOptions(max_batch_size=8, batch_timeout_micros=5_000_000, num_batch_threads=1)
    assert default_grpc_threads(None, cpus=1) == 4
    threads = default_grpc_threads(batching, cpus=1)
    assert threads >= 2 * batching.max_batch_size
    config = configs.single_model_config("tiny", str(tiny_models))
    server = EmbeddedServer(
        config,
        ServerOptions(
            port=0,
            grpc_max_threads=threads,
            batching=batching,
            enable_model_warmup=False,
            file_system_poll_wait_seconds=0,
        ),
    )
    port = server.start()
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"localhost:{port}"))
        request = predict_request("tiny", "predict", {"images": random_images(1, SIZE, 0)})
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stub.Predict, request, timeout=60) for _ in range(8)]
            assert all(f.result().outputs["class_index"].tensor_shape.dim[0].size == 1 for f in futures)
        assert server.batcher.batch_sizes == {8: 1}  # one full batch, closed without waiting out the timeout
    finally:
        server.stop(grace=1)


def _batch_of_8(tiny_models, rerun_failed: bool, requests: list) -> tuple[list, collections.Counter]:
    """Send 8 requests at once to an embedded server that batches up to 8 (one batch, no timeout
    reached); returns each response or RpcError, and the batch sizes the server ran."""
    batching = configs.BatchingOptions(max_batch_size=8, batch_timeout_micros=10_000_000, num_batch_threads=1)
    server = EmbeddedServer(
        configs.single_model_config("tiny", str(tiny_models)),
        ServerOptions(
            port=0,
            batching=batching,
            enable_model_warmup=False,
            file_system_poll_wait_seconds=0,
            rerun_failed_batches=rerun_failed,
        ),
    )
    port = server.start()
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"localhost:{port}"))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stub.Predict, request, timeout=120) for request in requests]
            answers = [f.exception() or f.result() for f in futures]
        return answers, server.batcher.batch_sizes
    finally:
        server.stop(grace=1)


@local_only
@pytest.mark.parametrize("fault", ["class_index out of range", "corrupt image", "wrong image size"])
def test_one_bad_request_in_a_batch_of_8_under_tf_serving_semantics(tiny_models, reference, fault):
    """One status per batch, as in TF Serving. The graph isolates the faults it can detect: the bad
    request gets its row's error, the 7 others their results. A fault that stops the batch from
    being formed (a request of another image size cannot be concatenated) fails all 8, as in TF
    Serving, unless the embedded server's own --rerun_failed_batches is on."""
    batch = random_images(8, SIZE, 41)
    bad_row = 5
    signature = "gradcam_bytes" if fault == "corrupt image" else "gradcam"

    def request(i: int):
        image = batch[i]
        if signature == "gradcam_bytes":
            data = png(image)
            inputs = {"image_bytes": np.array([data[: len(data) // 2] if i == bad_row else data], object)}
        else:
            inputs = {
                "images": random_images(1, SIZE + 3, i)
                if (i == bad_row and fault == "wrong image size")
                else image[None]
            }
        inputs["class_index"] = np.array(
            [NUM_CLASSES if (i == bad_row and fault == "class_index out of range") else -1], np.int32
        )
        return predict_request("tiny", signature, inputs)

    for rerun_failed in (False, True) if fault == "wrong image size" else (False,):
        answers, batch_sizes = _batch_of_8(tiny_models, rerun_failed, [request(i) for i in range(8)])
        if fault == "wrong image size":  # the 8 cannot be merged into one batch: nothing ran as 8
            assert batch_sizes == ({1: 8} if rerun_failed else {})
        else:
            assert batch_sizes == {8: 1}  # one batch of the 8 requests
        if fault == "wrong image size" and not rerun_failed:
            for answer in answers:  # the whole batch fails, as TF Serving fails it
                assert isinstance(answer, grpc.RpcError) and answer.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "Tensors with name 'images' from different tasks have different shapes" in answer.details()
            continue
        expected = reference(tiny_models / "2", "gradcam", images=batch, class_index=np.full(8, -1, np.int32))
        for i, answer in enumerate(answers):
            if i != bad_row:
                out = arrays(answer)
                assert out["error"][0] == b""
                np.testing.assert_allclose(out["heatmap"][0], expected["heatmap"][i], rtol=1e-5, atol=1e-5)
            elif fault == "wrong image size":  # rerun alone: the graph's own check
                assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"images: expected shape [N,{SIZE},{SIZE},3]" in answer.details()
            else:  # computed in the batch; its row says why
                error = arrays(answer)["error"][0].decode()
                assert error == (
                    "image_bytes: the image cannot be decoded (corrupt or truncated?)"
                    if fault == "corrupt image"
                    else f"class_index {NUM_CLASSES} is out of range: this model has {NUM_CLASSES} classes "
                    f"(0..{NUM_CLASSES - 1}; -1 = the predicted class)"
                )


# --- batching, unit level --------------------------------------------------------------------


def _doubler(calls: list):
    def run(inputs):
        calls.append({k: v.copy() for k, v in inputs.items()})
        if (inputs["x"] < 0).any():
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "negative input")
        return {"y": inputs["x"] * 2, "n": inputs["x"][:, 0]}

    return run


def _submit_concurrently(batcher: Batcher, tasks: list[np.ndarray], key="k", run=None):
    run = run or _doubler([])
    with concurrent.futures.ThreadPoolExecutor(len(tasks)) as pool:
        futures = [pool.submit(batcher.submit, key, run, {"x": t}, len(t)) for t in tasks]
        return [f.exception() or f.result() for f in futures]


def test_batcher_groups_pads_and_splits():
    batcher = Batcher(
        configs.BatchingOptions(
            max_batch_size=8, allowed_batch_sizes=(2, 8), batch_timeout_micros=500_000, num_batch_threads=1
        )
    )
    calls = []
    tasks = [np.full((i + 1, 3), i + 1, np.int64) for i in range(3)]  # 1 + 2 + 3 = 6 rows
    results = _submit_concurrently(batcher, tasks, run=_doubler(calls))
    batcher.stop()
    assert len(calls) == 1 and calls[0]["x"].shape == (8, 3)  # one call, padded 6 -> 8
    assert (calls[0]["x"][6:] == calls[0]["x"][5]).all()  # padding: the last request's first row, as TF Serving
    assert batcher.batch_sizes == {8: 1}
    for task, result in zip(tasks, results):
        np.testing.assert_array_equal(result["y"], task * 2)
        np.testing.assert_array_equal(result["n"], task[:, 0])


@pytest.mark.parametrize("rerun_failed", [False, True])
def test_batcher_keeps_keys_apart_and_fails_a_batch_as_tf_serving_does(rerun_failed):
    """TF Serving gives a batch one status: a failing run fails every request in it. The rerun
    option (ours) runs a failed batch again one request at a time, so that only the bad one fails."""
    batcher = Batcher(
        configs.BatchingOptions(max_batch_size=8, batch_timeout_micros=500_000, num_batch_threads=2),
        rerun_failed=rerun_failed,
    )
    calls = []
    run = _doubler(calls)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(batcher.submit, "a", run, {"x": np.ones((1, 2))}, 1) for _ in range(2)]
        bad = pool.submit(batcher.submit, "a", run, {"x": -np.ones((1, 2))}, 1)
        other = pool.submit(batcher.submit, "b", run, {"x": np.ones((2, 2))}, 2)
        assert isinstance(bad.exception(), ServingError) and bad.exception().code == grpc.StatusCode.INVALID_ARGUMENT
        if rerun_failed:
            assert all((f.result()["y"] == 2).all() for f in good)
        else:
            assert all(f.exception() is bad.exception() for f in good)
        assert other.result()["y"].shape == (2, 2)
    batcher.stop()
    sizes = sorted(len(c["x"]) for c in calls)
    assert sizes == ([1, 1, 1, 2, 3] if rerun_failed else [2, 3])  # "a": a batch of 3 (then 1 + 1 + 1); "b" apart


def test_batcher_refuses_to_merge_different_shapes_like_tf_serving():
    batcher = Batcher(configs.BatchingOptions(max_batch_size=8, batch_timeout_micros=300_000, num_batch_threads=1))
    results = _submit_concurrently(batcher, [np.ones((1, 2)), np.ones((1, 3))])
    batcher.stop()
    for result in results:
        assert isinstance(result, ServingError) and result.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "Tensors with name 'x' from different tasks have different shapes" in result.message


def test_batcher_refuses_when_the_queue_is_full():
    started, release = threading.Event(), threading.Event()

    def slow(inputs):
        started.set()
        release.wait(10)
        return {"y": inputs["x"]}

    batcher = Batcher(configs.BatchingOptions(max_batch_size=2, max_enqueued_batches=1, num_batch_threads=1))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = pool.submit(batcher.submit, "k", slow, {"x": np.zeros((2, 1))}, 2)  # full: runs, blocks
        assert started.wait(10)
        queued = pool.submit(batcher.submit, "k", slow, {"x": np.zeros((2, 1))}, 2)  # waits in the queue
        assert wait_for(lambda: len(batcher._queues.get("k", ())) == 1)
        with pytest.raises(ServingError) as refused:
            batcher.submit("k", slow, {"x": np.zeros((1, 1))}, 1)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert running.result()["y"].shape == (2, 1) and queued.result()["y"].shape == (2, 1)
    with pytest.raises(ServingError) as too_big:
        batcher.submit("k", slow, {"x": np.zeros((3, 1))}, 3)
    assert too_big.value.code == grpc.StatusCode.INVALID_ARGUMENT
    batcher.stop()
    with pytest.raises(ServingError) as stopped:
        batcher.submit("k", slow, {"x": np.zeros((1, 1))}, 1)
    assert stopped.value.code == grpc.StatusCode.UNAVAILABLE


def test_batcher_splits_large_tasks_when_enabled():
    calls = []
    batcher = Batcher(
        configs.BatchingOptions(
            max_batch_size=32,
            allowed_batch_sizes=(4, 32),
            num_batch_threads=1,
            enable_large_batch_splitting=True,
            max_execution_batch_size=4,
        )
    )
    x = np.arange(10 * 2).reshape(10, 2)
    result = batcher.submit("k", _doubler(calls), {"x": x}, 10)
    batcher.stop()
    np.testing.assert_array_equal(result["y"], x * 2)
    assert [len(c["x"]) for c in calls] == [4, 4, 4]  # 4 + 4 + 2 padded to 4


def test_clean_tf_message_reads_like_a_sentence():
    raw = (
        "Graph execution error:\n\nDetected at node assert_less/Assert/Assert defined at (most recent call last):\n"
        "<stack traces unavailable>\nassertion failed: [class_index out of range: 5 classes] "
        "[Condition x < y did not hold element-wise:] [x (class_index:0) = ] [5 0] [y (assert_less/y:0) = ] [5]\n"
        "\t [[{{node assert_less/Assert/Assert}}]] [Op:__inference_signature_wrapper_631]"
    )
    assert clean_tf_message(raw) == (
        "assertion failed: class_index out of range: 5 classes; "
        "Condition x < y did not hold element-wise: x = [5 0]; y = 5"
    )


@pytest.mark.parametrize(
    "array",
    [np.random.default_rng(0).random((2, 3, 4), dtype=np.float32), np.random.default_rng(0).random(5),
     np.random.default_rng(0).integers(0, 256, (3, 7, 5), dtype=np.uint8), np.array([0, 127, 128, 255], np.uint8),
     np.array([[-1, 3], [2**31 - 1, -(2**31)]], np.int32), np.array([2**40, -5], np.int64), np.array([True, False]),
     np.array([[b"a", b""], [b"\xff" * 300, b"d"]], object), np.zeros((0, 4), np.float32)],
)
def test_encode_tensor_round_trips_in_typed_fields(array):
    proto = encode_tensor(array)
    assert proto.tensor_content == b""
    decoded = tf.make_ndarray(proto)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    if array.dtype in (np.float32, np.float64) and array.size:  # raw bytes == what protobuf writes itself
        reference = tensor_pb2.TensorProto(dtype=proto.dtype, tensor_shape=proto.tensor_shape)
        getattr(reference, "float_val" if array.dtype == np.float32 else "double_val").extend(array.ravel().tolist())
        assert proto.SerializeToString() == reference.SerializeToString()
    content = encode_tensor(array, as_tensor_content=True)
    np.testing.assert_array_equal(tf.make_ndarray(content), array)
