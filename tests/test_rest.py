"""The REST port: equal to gRPC, TF Serving's errors, the README's curl example, the manifests'
probes exactly as written, and a Prometheus scrape parsed as Prometheus parses it."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import shutil
import subprocess

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import servers
import synthetic
from calls import model_spec
from camserve.serving.configs import BatchingOptions
from images import jpeg, random_images
from servers import http
from synthetic import TINY_SIZE as SIZE

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVING = ROOT / "serving"
PROBE_MODEL = "efficientnet_lite0_cam"  # the name the manifests' probes ask for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model as "tiny" and under the manifests' name, batching on, metrics on."""
    base = tmp_path_factory.mktemp("rest") / "tiny"
    synthetic.export_tiny(base)
    batching = BatchingOptions(max_batch_size=8, batch_timeout_micros=1000, num_batch_threads=1)
    with servers.running({"tiny": base, PROBE_MODEL: base}, batching=batching) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _grpc(stub, signature: str, inputs: dict) -> dict[str, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "tiny", signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return {k: tf.make_ndarray(v) for k, v in stub.Predict(request, timeout=60).outputs.items()}


def _assert_equal(rest_value, grpc_value: np.ndarray, name: str) -> None:
    if grpc_value.dtype == object:  # strings: b64 when the name ends in _bytes, text otherwise
        flat = np.array(rest_value, dtype=object).ravel()
        if name.endswith("_bytes"):
            got = [base64.b64decode(v["b64"]) for v in flat]
        else:
            got = [v.encode() for v in flat]
        assert got == list(grpc_value.ravel()), name
    else:
        np.testing.assert_array_equal(np.array(rest_value, dtype=grpc_value.dtype), grpc_value, err_msg=name)


def test_rest_and_grpc_give_equal_outputs(server, stub):
    images, classes = random_images(2, SIZE, 0), np.array([-1, 2], np.int32)
    # Row format, uint8 pixels as JSON numbers.
    status, _, text = http(server.rest_port, "/v1/models/tiny:predict", {
        "signature_name": "gradcam",
        "instances": [{"images": images[i].tolist(), "class_index": int(classes[i])} for i in range(2)]})
    assert status == 200, text
    rows = json.loads(text)["predictions"]
    expected = _grpc(stub, "gradcam", {"images": images, "class_index": classes})
    assert len(rows) == 2 and set(rows[0]) == set(expected)
    for name, value in expected.items():
        _assert_equal([row[name] for row in rows], value, name)
    # Columnar format, encoded images as b64: the PNG heatmap comes back as b64.
    jpegs = [jpeg(image) for image in images]
    status, _, text = http(server.rest_port, "/v1/models/tiny:predict", {
        "signature_name": "gradcam_bytes",
        "inputs": {"image_bytes": [{"b64": base64.b64encode(j).decode()} for j in jpegs],
                   "class_index": classes.tolist()}})
    assert status == 200, text
    columns = json.loads(text)["outputs"]
    expected = _grpc(stub, "gradcam_bytes", {"image_bytes": np.array(jpegs, dtype=object), "class_index": classes})
    assert set(columns) == set(expected)
    for name, value in expected.items():
        _assert_equal(columns[name], value, name)
    assert isinstance(columns["class_label"][0], str)  # text stays text
    assert tf.io.decode_png(base64.b64decode(columns["heatmap_png_bytes"][0]["b64"])).shape == (SIZE, SIZE, 1)


def test_every_binary_string_output_is_named_for_rest(server):
    """TF Serving's REST API writes a string output as b64 only when its name ends in _bytes: every
    string output that is not text (a PNG) must be named so, and text outputs must not."""
    signatures = server.registry.resolve(model_spec("tiny")).signatures
    binary, text = set(), set()
    for signature in signatures.values():
        for name, info in signature.outputs.items():
            if info.dtype == tf.string.as_datatype_enum:
                (binary if "png" in name else text).add(name)
    assert binary == {"heatmap_png_bytes"}
    assert text == {"class_label", "top_k_labels", "error"}
    assert all(not name.endswith("_bytes") for name in text)


def _bytes_request(**extra) -> dict:
    encoded = base64.b64encode(jpeg(random_images(1, SIZE, 0)[0])).decode()
    return {"signature_name": "gradcam_bytes", "instances": [{"image_bytes": {"b64": encoded}, "class_index": -1}],
            **extra}


# (case, method, path, body, HTTP status, words of the message): TF Serving's code for each, from
# http_server.cc's mapping and the messages of http_rest_api_handler.cc / json_tensor.cc.
ERRORS = [
    (
        "unknown model",
        "POST",
        "/v1/models/nope:predict",
        _bytes_request(),
        404,
        "Servable not found for request: Latest(nope)",
    ),
    (
        "unknown version",
        "POST",
        "/v1/models/tiny/versions/9:predict",
        _bytes_request(),
        404,
        "Servable not found for request: Specific(tiny, 9)",
    ),
    (
        "unknown label",
        "GET",
        "/v1/models/tiny/labels/canary/metadata",
        None,
        400,
        "Unrecognized servable version label: canary",
    ),
    (
        "unknown signature",
        "POST",
        "/v1/models/tiny:predict",
        _bytes_request(signature_name="nope"),
        400,
        'Serving signature key "nope" not found',
    ),
    ("bad JSON", "POST", "/v1/models/tiny:predict", b'{"instances": [1, 2', 400, "JSON Parse error"),
    ("empty body", "POST", "/v1/models/tiny:predict", b"", 400, "JSON Parse error: The document is empty"),
    ("not an object", "POST", "/v1/models/tiny:predict", b"[1]", 400, "Is not object"),
    (
        "wrong b64",
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "gradcam_bytes", "instances": [{"image_bytes": {"b64": "not base64!"}, "class_index": -1}]},
        400,
        "Unable to base64 decode",
    ),
    (
        "both formats",
        "POST",
        "/v1/models/tiny:predict",
        {**_bytes_request(), "inputs": {}},
        400,
        "expecting only one of 'inputs' or 'instances' keys to exist",
    ),
    (
        "no format",
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "gradcam_bytes"},
        400,
        "Missing 'inputs' or 'instances' key",
    ),
    (
        "missing input",
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "gradcam_bytes", "inputs": {"image_bytes": []}},
        400,
        "Missing named input: class_index",
    ),
    (
        "empty instances",
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "predict", "instances": []},
        400,
        "No values in 'instances' array",
    ),
    (
        "ragged lists",
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "predict", "inputs": [[[[0, 0, 0]]], [[[0, 0, 0], [0, 0, 0]]]]},
        400,
        "ragged",
    ),
    (
        "wrong type",
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "predict", "instances": [[[[0.5, 0, 0]]]]},
        400,
        "is not of expected type: uint8",
    ),
    (
        "wrong image shape (the graph's own check)",
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "predict", "instances": np.zeros((1, 8, 8, 3), int).tolist()},
        400,
        f"images: expected shape [N,{SIZE},{SIZE},3]",
    ),
    (
        "malformed URL",
        "GET",
        "/v1/models/tiny/versions/x",
        None,
        400,
        "Malformed request: GET /v1/models/tiny/versions/x",
    ),
    ("predict by GET", "GET", "/v1/models/tiny:predict", None, 400, "Malformed request"),
    ("no model name", "GET", "/v1/models", None, 400, "Missing model name in request."),
    (
        "unknown version status",
        "GET",
        "/v1/models/tiny/versions/3",
        None,
        404,
        "Could not find version 3 of model tiny",
    ),
    (
        "version overflow",
        "GET",
        "/v1/models/tiny/versions/99999999999999999999",
        None,
        400,
        "Failed to convert version: 99999999999999999999 to numeric.",
    ),
    ("classify", "POST", "/v1/models/tiny:classify", {"examples": []}, 501, "classify is not served here"),
]


@pytest.mark.parametrize("case,method,path,body,status,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_come_back_as_tf_serving_answers_them(server, case, method, path, body, status, words):
    got, content_type, text = http(server.rest_port, path, body, method=method)
    assert got == status, text
    assert content_type == "application/json"
    answer = json.loads(text)
    assert list(answer) == ["error"] and words in answer["error"]


def test_oversized_body_and_unknown_path(tmp_path, server):
    # A path outside /v1/ and the metrics path: libevent's 404 page in TF Serving.
    status, content_type, text = http(server.rest_port, "/healthz")
    assert (status, content_type) == (404, "text/html") and "404 Not Found" in text
    base = pathlib.Path(server.registry.resolve(model_spec("tiny")).path).parent
    with servers.running({"tiny": base}, max_message_bytes=1000, enable_model_warmup=False) as small:
        status, _, text = http(small.rest_port, "/v1/models/tiny:predict", _bytes_request())  # ours: refused unread
        assert status == 413 and "more than the 1000 allowed" in json.loads(text)["error"]


def test_readme_curl_example(server, tmp_path):
    """The README's REST example, run as written (port and model of this test's server)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- rest-example -->\n```sh\n(.*?)```", readme, re.S)[1]
    script = block.replace("localhost:8501", f"localhost:{server.rest_port}").replace("samples/", f"{ROOT}/samples/")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert '"state": "AVAILABLE"' in result.stdout
    heatmap = tf.io.decode_png((tmp_path / "heatmap.png").read_bytes())
    assert heatmap.shape[2] == 1 and heatmap.shape[0] > 0
    assert re.search(r"class_\d", result.stdout)  # the printed label


def _deployment_probes() -> dict[str, dict]:
    deployment = yaml.safe_load((SERVING / "k8s" / "deployment.yaml").read_text())
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "tfserving")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        probe["httpGet"]["port"] = ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"])
    return probes


@pytest.mark.parametrize("kind", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_kubernetes_probes_pass_as_written(server, kind):
    """Kubernetes counts an httpGet probe passed on 200-399 within timeoutSeconds."""
    probe = _deployment_probes()[kind]["httpGet"]
    assert probe["port"] == 8501  # the REST port, which the test server has elsewhere
    status, _, text = http(server.rest_port, probe["path"])
    assert 200 <= status < 400, text
    assert json.loads(text)["model_version_status"][0]["state"] == "AVAILABLE"


def _health_commands() -> dict[str, str]:
    compose = yaml.safe_load((SERVING / "docker-compose.yml").read_text())
    service = next(iter(compose["services"].values()))
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    dockerfile = (SERVING / "Dockerfile").read_text()
    command = re.search(r"HEALTHCHECK [^\n]*\\\n\s+CMD (.*)", dockerfile)[1]
    return {"compose": test[1], "Dockerfile": command}


@pytest.mark.parametrize("where", ["compose", "Dockerfile"])
def test_container_health_checks_pass_as_written(server, where):
    assert shutil.which("curl"), "the health checks run curl: install it (.ci/run does)"
    command = _health_commands()[where].replace("localhost:8501", f"localhost:{server.rest_port}")
    env = {**os.environ, "MODEL_NAME": PROBE_MODEL}
    assert subprocess.run(["sh", "-c", command], env=env, timeout=30).returncode == 0
    broken = command.replace(PROBE_MODEL, "nope").replace("${MODEL_NAME}", "nope")  # it can fail too
    assert subprocess.run(["sh", "-c", broken], env=env, timeout=30, capture_output=True).returncode != 0


def _scrape(server) -> tuple[dict, str]:
    status, content_type, text = http(server.rest_port, "/monitoring/prometheus/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(text)}, text


def _value(families: dict, sample_name: str, **labels) -> float:
    """Summed over the other labels; 0 when absent (the parser names counter samples *_total)."""
    names = (sample_name, sample_name + "_total")
    return sum(
        s.value
        for f in families.values()
        for s in f.samples
        if s.name in names and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_scrape(server, stub):
    before, _ = _scrape(server)
    _grpc(stub, "gradcam", {"images": random_images(3, SIZE, 0), "class_index": np.full(3, -1, np.int32)})
    http(server.rest_port, "/v1/models/tiny:predict", _bytes_request())
    http(server.rest_port, "/v1/models/tiny:predict", b"{bad")
    after, text = _scrape(server)

    def delta(sample_name: str, **labels) -> float:
        return _value(after, sample_name, **labels) - _value(before, sample_name, **labels)

    count = ":tensorflow:serving:request_count"
    assert f"# TYPE {count} counter" in text and f"{count}_total" not in text  # TF Serving's name, no _total
    assert delta(count, model_name="tiny", status="OK") == 2  # scrapes are not requests
    assert delta(count, model_name="tiny", status="INVALID_ARGUMENT") == 1
    assert delta(":tensorflow:serving:request_latency_count", model_name="tiny", API="Predict", entrypoint="GRPC") == 1
    assert delta(":tensorflow:serving:request_latency_count", model_name="tiny", API="predict", entrypoint="REST") == 1
    assert delta(":tensorflow:serving:batching_session:input_batch_size_count") == 2
    assert delta(":tensorflow:serving:batching_session:input_batch_size_sum") == 4  # 3 images + 1
    assert delta(":tensorflow:serving:batching_session:queuing_latency_count", thread_pool_name="batch_threads") == 2
    assert delta(":camserve:heatmap_count", model_name="tiny", method="gradcam") == 3
    assert delta(":camserve:heatmap_count", model_name="tiny", method="gradcam_bytes") == 1
    assert _value(after, ":camserve:model_version_state", model_name="tiny", version="1", state="AVAILABLE") == 1
    assert _value(after, ":tensorflow:cc:saved_model:load_attempt_count", status="success") == 2
