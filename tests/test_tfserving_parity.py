"""What TF Serving does, behaviour by behaviour (with the source file that says so), and a check
that the embedded server does the same. docs/DEPLOYING.md's "TF Serving parity" table is this list."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import shutil
from typing import Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

import servers
import synthetic
from calls import wait_for
from camserve.serving import configs, json_tensor, rest
from camserve.serving.__main__ import options_from_args, parser
from camserve.serving.server import ServerOptions, StartupError, serve
from camserve.serving.tfserving import server_flags
from servers import http
from synthetic import TINY_SIZE as SIZE

ROOT = pathlib.Path(__file__).resolve().parent.parent
State = get_model_status_pb2.ModelVersionStatus.State


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    """A version directory of the tiny model, copied into each test's own base paths."""
    return synthetic.export_tiny(tmp_path_factory.mktemp("parity") / "tiny")


def _copy(version_dir: pathlib.Path, base: pathlib.Path, name: str) -> None:
    staging = base / f".{name}-staging"
    shutil.copytree(version_dir, staging)
    staging.rename(base / name)


def _status(server, model: str) -> list[tuple[int, str, int, str]]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=30)
    return [(s.version, State.Name(s.state), s.status.error_code, s.status.error_message)
            for s in response.model_version_status]


def _predict_version(server, model: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = model, "predict"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, SIZE, SIZE, 3), np.uint8)))
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    return response.model_spec.version.value


# --- the checks --------------------------------------------------------------------------------


def leading_zeros(tiny, tmp_path):
    _copy(tiny, tmp_path, "00000123")
    with servers.running({"m": tmp_path}) as server:
        assert _status(server, "m") == [(123, "AVAILABLE", 0, "")]
        assert _predict_version(server, "m") == 123


def every_version_newest_first(tiny, tmp_path):
    _copy(tiny, tmp_path, "1")
    with servers.running({"m": tmp_path}) as server:
        broken = tmp_path / ".3-staging"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        broken.rename(tmp_path / "3")
        # The latest policy aims at 3, which fails: END with its error, and 1 stays served.
        assert wait_for(lambda: _status(server, "m")[0][:2] == (3, "END"), 60, 0.2)
        [(_, _, code3, message3), *others] = _status(server, "m")
        assert code3 != 0 and message3 and others == [(1, "AVAILABLE", 0, "")]
        _copy(tiny, tmp_path, "4")  # a newer good version: 1 is unloaded (END, OK) once 4 is available
        assert wait_for(lambda: [s[:3] for s in _status(server, "m")] ==
                         [(4, "AVAILABLE", 0), (3, "END", code3), (1, "END", 0)], 60, 0.2)
        status, _, text = http(server.rest_port, "/v1/models/m/labels/anything")  # a label is ignored here
        assert status == 200 and [s["version"] for s in json.loads(text)["model_version_status"]] == ["4", "3", "1"]


def startup_fails_on_a_failed_load(tiny, tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    config = configs.single_model_config("m", str(tmp_path))
    with pytest.raises(StartupError, match=r"1 servable\(s\) did not become available: \{model m version 1: "):
        servers.start({"m": tmp_path})
    assert serve(config, ServerOptions(port=0)) == 255  # the exit status of TF Serving's main on this


def reload_config_request(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _copy(tiny, tmp_path / "a", "1")
    _copy(tiny, tmp_path / "b", "2")
    with servers.running({"a": tmp_path / "a"}) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            new = configs.single_model_config("b", str(tmp_path / "b"))
            response = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=new), timeout=60)
            assert response.status.error_code == 0
            with pytest.raises(grpc.RpcError) as error:  # only model_config_list
                stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _status(server, "b") == [(2, "AVAILABLE", 0, "")] and _predict_version(server, "b") == 2
        with pytest.raises(grpc.RpcError) as error:
            _predict_version(server, "a")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert _status(server, "a") == [(1, "END", 0, "")]  # the monitor never forgets a version


def config_file_poll(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    _copy(tiny, tmp_path / "a", "1")
    config_file = tmp_path / "models.config"
    config_file.write_text(str(configs.single_model_config("a", str(tmp_path / "a"))))
    with servers.running({"a": tmp_path / "a"}, model_config_file=str(config_file),
                                model_config_file_poll_wait_seconds=0.3) as server:
        config_file.write_text(str(configs.single_model_config("b", str(tmp_path / "a"))))
        assert wait_for(lambda: server.registry.model_names == ["b"], 60, 0.2)
        assert _status(server, "b") == [(1, "AVAILABLE", 0, "")] and _predict_version(server, "b") == 1


def rest_off_by_default(tiny, tmp_path):
    assert ServerOptions().rest_api_port == 0
    assert parser().parse_args(["--model_base_path", "x"]).rest_api_port == 0


def metrics_only_when_configured(tiny, tmp_path):
    _copy(tiny, tmp_path, "1")
    with servers.running({"m": tmp_path}, metrics=False) as server:
        status, content_type, _ = http(server.rest_port, "/monitoring/prometheus/metrics")
        assert (status, content_type) == (404, "text/html")


def status_and_metadata_json(tiny, tmp_path):
    _copy(tiny, tmp_path, "1")
    with servers.running({"m": tmp_path}) as server:
        status, content_type, text = http(server.rest_port, "/v1/models/m")
        assert status == 200 and content_type == "application/json"
        assert json.loads(text) == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
        status, _, text = http(server.rest_port, "/v1/models/m/versions/1/metadata")
        metadata = json.loads(text)
        assert metadata["model_spec"] == {"name": "m", "signature_name": "", "version": "1"}
        gradcam = metadata["metadata"]["signature_def"]["signature_def"]["gradcam"]
        assert gradcam["inputs"]["images"]["dtype"] == "DT_UINT8"
        assert gradcam["inputs"]["images"]["tensor_shape"]["dim"][0] == {"size": "-1", "name": ""}


def answer_formats(tiny, tmp_path):
    one = {"y": np.array([[1.5], [2.0]], np.float32)}
    assert json.loads(json_tensor.answer_json(one, json_tensor.ROW)) == {"predictions": [[1.5], [2.0]]}
    assert json.loads(json_tensor.answer_json(one, json_tensor.COLUMNAR)) == {"outputs": [[1.5], [2.0]]}
    two = {"a": np.array([1, 2], np.int32), "b_bytes": np.array([b"\x89P", b"z"], dtype=object),
           "label": np.array([b"cat", b"dog"], dtype=object)}
    assert json.loads(json_tensor.answer_json(two, json_tensor.ROW)) == {"predictions": [
        {"a": 1, "b_bytes": {"b64": "iVA="}, "label": "cat"}, {"a": 2, "b_bytes": {"b64": "eg=="}, "label": "dog"}]}
    floats = json_tensor.answer_json({"x": np.array([math.nan, math.inf, -math.inf, 0.1, 4.0], np.float32)},
                                     json_tensor.COLUMNAR)
    assert floats == '{"outputs": [NaN, Infinity, -Infinity, 0.1, 4.0]}'


def http_codes(tiny, tmp_path):
    expected = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
                "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
                "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
                "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}
    assert {code.name: status for code, status in rest.HTTP_STATUS.items()} == expected


def _tf_serving_command_lines() -> dict[str, list[str]]:
    dockerfile = (ROOT / "serving" / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"ENTRYPOINT (\[.*?\])", dockerfile, re.S)[1].replace("\\\n", ""))
    deployment = yaml.safe_load((ROOT / "serving" / "k8s" / "deployment.yaml").read_text())
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return {
        "Dockerfile ENTRYPOINT": entrypoint[1:],
        "k8s args": [a for c in containers for a in c.get("args", [])],
        "serving.tfserving": server_flags("/config/models.config", "/config/batching.config",
                                          "/config/monitoring.config", 8500, 8501, 60, 0.5, "gpu"),
    }


def flag_forms(tiny, tmp_path):
    # TF Serving reads only --flag=value (a spaced value is an "unknown argument" and the default
    # stays): every TF Serving command line we write uses "=".
    for where, flags in _tf_serving_command_lines().items():
        bad = [f for f in flags if not re.fullmatch(r"--[a-z_]+=\S+", f)]
        assert not bad, f"{where}: TF Serving ignores {bad}"
    # The embedded server reads both forms the same.
    p = parser()
    spaced = p.parse_args(["--model_base_path", "x", "--rest_api_port", "8501", "--rest_api_timeout_in_ms", "5"])
    joined = p.parse_args(["--model_base_path=x", "--rest_api_port=8501", "--rest_api_timeout_in_ms=5"])
    assert vars(spaced) == vars(joined)
    _, options = options_from_args(joined, p)
    assert (options.rest_api_port, options.rest_api_timeout_in_ms) == (8501, 5)


@dataclasses.dataclass(frozen=True)
class Behaviour:
    name: str
    source: str  # in github.com/tensorflow/serving unless it says otherwise
    tf_serving: str
    check: Callable


PARITY = [
    Behaviour("version directories with leading zeros", "sources/storage_path/file_system_storage_path_source.cc",
              "00000123 is version 123 (SimpleAtoi); non-numeric names are skipped", leading_zeros),
    Behaviour("GetModelStatus", "model_servers/get_model_status_impl.cc, core/servable_state_monitor.h",
              "every version it has seen, newest first: LOADING, AVAILABLE, UNLOADING, END; a failed load END with "
              "its error; a version label is ignored", every_version_newest_first),
    Behaviour("a model that cannot load at start", "model_servers/server.cc, server_core.cc",
              "no port opens; exits 255: \"N servable(s) did not become available\"", startup_fails_on_a_failed_load),
    Behaviour("HandleReloadConfigRequest", "model_servers/model_service_impl.cc, server_core.cc",
              "the new model_config_list replaces the old: new models load, missing ones unload (their versions "
              "stay END in GetModelStatus); other config types refused", reload_config_request),
    Behaviour("--model_config_file_poll_wait_seconds", "model_servers/server.cc",
              "re-reads the file and reloads when it changed; 0 = never", config_file_poll),
    Behaviour("REST port", "model_servers/server.h, main.cc", "--rest_api_port, 0 (default) = no REST",
              rest_off_by_default),
    Behaviour("metrics path", "model_servers/http_server.cc",
              "only with prometheus_config { enable: true }; otherwise a 404 page", metrics_only_when_configured),
    Behaviour("status and metadata JSON", "model_servers/http_rest_api_util.cc",
              "version as a string, states by name, empty error_message written; signature_def nested twice",
              status_and_metadata_json),
    Behaviour("predict JSON", "util/json_tensor.cc",
              "rows -> \"predictions\", columns -> \"outputs\"; one output unnamed; *_bytes strings as b64, "
              "others as text; NaN/Infinity written bare; floats in the shortest form", answer_formats),
    Behaviour("HTTP codes", "model_servers/http_server.cc", "mapped from the gRPC code (ToHTTPStatusCode)",
              http_codes),
    Behaviour("flag forms", "main.cc + TensorFlow's command_line_flags.cc",
              "only --flag=value (booleans also --flag); \"--flag value\" is ignored with \"unknown argument\"",
              flag_forms),
]


@pytest.mark.parametrize("behaviour", PARITY, ids=[b.name for b in PARITY])
def test_the_embedded_server_does_what_tf_serving_does(behaviour, tiny, tmp_path):
    behaviour.check(tiny, tmp_path)
