"""TF Serving's REST API on --rest_api_port: model status, metadata, predict, Prometheus metrics.

Paths, JSON and status codes follow TF Serving's model_servers/http_rest_api_handler.cc and
http_server.cc:

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            GetModelStatus as JSON
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   GetModelMetadata (signature_def)
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    Predict (serving/json_tensor.py)
    GET  {monitoring path}                                       Prometheus text (--monitoring_config_file)

An error is `{"error": "message"}` with the HTTP code TF Serving maps from the gRPC code; a path
outside /v1/ and the metrics path is a 404 HTML page, as libevent answers in TF Serving. Predict
runs on the same path as gRPC Predict (checks, batching, Session::Run), so both give the same
outputs. Ours, not TF Serving's: a body larger than --max_message_bytes is refused with 413 before it
is read, and --max_concurrent_requests caps REST calls too (429).
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from typing import Callable

import grpc
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2

from . import json_tensor
from .errors import ServingError
from .metrics import CONTENT_TYPE, Metrics
from .registry import ModelRegistry

log = logging.getLogger("serving.rest")

# http_server.cc ToHTTPStatusCode
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}
# http_rest_api_util.cc: POST .../model[/versions/v|/labels/l]:method, GET .../model[...][/metadata]
_POST = re.compile(r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
_GET = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
_V1 = re.compile(r"(?i)/v1/.*")
_NOT_FOUND_PAGE = "<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n"


def _model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name))
    if version is not None:
        number = int(version)
        if number >= 2**63:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Failed to convert version: {version} to numeric.")
        spec.version.value = number
    if label is not None:
        spec.version_label = urllib.parse.unquote(label)
    return spec


class RestApi:
    """What the REST port answers, apart from HTTP itself (which `RestServer` does)."""

    def __init__(self, registry: ModelRegistry, predictor, model_status: Callable, metrics: Metrics | None,
                 metrics_path: str | None, timeout_seconds: float):
        self.registry = registry
        self.predictor = predictor  # serving.server.PredictionServicer
        self.model_status = model_status  # serving.server.model_status
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.timeout_seconds = timeout_seconds

    def handle(self, method: str, path: str, body: Callable[[], bytes]) -> tuple[int, str, str]:
        """(HTTP status, content type, body) for one request."""
        if self.metrics is not None and self.metrics_path and path.split("?")[0] == self.metrics_path:
            if path != self.metrics_path:
                return 400, "text/plain", f"Unexpected path: {path}. Should be {self.metrics_path}"
            return 200, CONTENT_TYPE, self.metrics.exposition().decode()
        if not _V1.fullmatch(path):
            return 404, "text/html", _NOT_FOUND_PAGE
        started = time.perf_counter()
        model_name, api, code = "", "", grpc.StatusCode.OK
        try:
            malformed = ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed request: {method} {path}")
            if method == "POST" and (match := _POST.fullmatch(path)):
                name, version, label, api = match.groups()
                spec = _model_spec(name, version, label)
                model_name = spec.name
                if api in ("classify", "regress"):
                    raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{api} is not served here: the models "
                                       "are explained through predict signatures")
                if api != "predict":  # the match ignores case, TF Serving's dispatch does not
                    raise malformed
                text = self._predict(spec, body())
            elif method == "GET" and (match := _GET.fullmatch(path)):
                name, version, label, subresource = match.groups()
                if not name:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name in request.")
                spec = _model_spec(name, version, label)
                model_name = spec.name
                text = self._metadata(spec) if subresource == "metadata" else self._status(spec)
            else:
                raise malformed
        except ServingError as e:
            code = e.code
            text = json.dumps({"error": e.message}, indent=4)
        except Exception as e:
            log.exception("REST %s %s failed", method, path)
            code = grpc.StatusCode.INTERNAL
            text = json.dumps({"error": f"internal error: {type(e).__name__}: {e}"}, indent=4)
        if self.metrics is not None:
            self.metrics.request(model_name, code.name, api or "", "REST", time.perf_counter() - started)
        return HTTP_STATUS.get(code, 500), "application/json", text

    def _status(self, spec: model_pb2.ModelSpec) -> str:
        spec.ClearField("version_label")  # TF Serving ignores a label here and lists every version
        return json_format.MessageToJson(self.model_status(self.registry, spec), indent=1,
                                         always_print_fields_with_no_presence=True)

    def _metadata(self, spec: model_pb2.ModelSpec) -> str:
        response = self.predictor.metadata(get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=spec, metadata_field=["signature_def"]))
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_defs)
        as_json = {
            "model_spec": json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True,
                                                    always_print_fields_with_no_presence=True),
            "metadata": {"signature_def": json_format.MessageToDict(
                signature_defs, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)},
        }
        return json.dumps(as_json, indent=1)

    def _predict(self, spec: model_pb2.ModelSpec, body: bytes) -> str:
        document = json_tensor.parse_body(body)
        spec.signature_name = document.get("signature_name", "")
        signature = self.registry.resolve(spec).signature(spec.signature_name)
        form, arrays = json_tensor.request_arrays(document, signature.inputs)
        request = predict_pb2.PredictRequest(model_spec=spec)
        for name, array in arrays.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        deadline = time.monotonic() + self.timeout_seconds
        _, _, outputs = self.predictor.predict(request, lambda: time.monotonic() < deadline)
        return json_tensor.answer_json(outputs, form)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "RestServer"
    protocol_version = "HTTP/1.1"
    server_version = "camserve"

    def setup(self) -> None:
        self.timeout = self.server.api.timeout_seconds  # a silent or idle connection is closed after it
        super().setup()

    def log_message(self, format: str, *args) -> None:  # access log at debug level, not stderr
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, content_type: str, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.server.cors:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "POST, GET")
            self.send_header("Access-Control-Allow-Headers", "Content-Type")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True  # the body may be unread
        self._reply(status, "application/json", json.dumps({"error": message}, indent=4))

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def _serve(self) -> None:
        server = self.server
        if self.command == "POST":
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._error(411, "a POST needs a Content-Length header (chunked bodies are not accepted)")
            if int(length) > server.max_body_bytes:
                return self._error(413, f"the request body has {length} bytes, more than the {server.max_body_bytes} "
                                        "allowed (--max_message_bytes)")
        if not server.admit():
            return self._error(429, "Concurrent RPC limit exceeded!")
        try:
            with server.workers:
                status, content_type, text = server.api.handle(self.command, self.path, self._body)
        finally:
            server.leave()
        self._reply(status, content_type, text)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    def do_OPTIONS(self) -> None:
        if self.server.cors and re.match(r"https?://", self.headers.get("Origin", "")):
            return self._reply(200, "text/plain", "")
        self._reply(400, "text/plain", "")


class RestServer(http.server.ThreadingHTTPServer):
    """The REST port: one thread per connection, at most `num_threads` requests computed at once."""

    daemon_threads = True

    def __init__(self, host: str, port: int, api: RestApi, num_threads: int, max_body_bytes: int,
                 max_concurrent: int = 0, cors: bool = False):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.api = api
        self.workers = threading.BoundedSemaphore(num_threads)
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.cors = cors
        self._inflight = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def admit(self) -> bool:
        with self._lock:
            if self.max_concurrent and self._inflight >= self.max_concurrent:
                return False
            self._inflight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1

    def start(self) -> int:
        self._thread = threading.Thread(target=self.serve_forever, name="rest", daemon=True)
        self._thread.start()
        return self.server_address[1]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
