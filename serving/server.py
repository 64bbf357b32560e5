"""The embedded server: TF Serving's gRPC and REST APIs without TF Serving.

For machines without the tensorflow_model_server binary (development, CI, laptops). It serves the
same SavedModel directories with the same `models.config`, answers with the same status codes and
the same response encoding, so a client cannot tell it from TF Serving. Implemented: Predict,
GetModelMetadata (signature_def), GetModelStatus, HandleReloadConfigRequest; the REST API and
Prometheus metrics on --rest_api_port (serving/rest.py); the other RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Callable, TypeVar

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from . import configs
from .batching import Batcher
from .configs import BatchingOptions
from .errors import ServingError
from .gpu import tensorflow_gpus
from .metrics import DEFAULT_PATH, Metrics
from .registry import ModelRegistry
from .rest import RestApi, RestServer
from .signatures import ModelVersion, Signature
from .tensors import encode_tensor

log = logging.getLogger("serving.server")

MAX_MESSAGE_BYTES = 2**31 - 1  # TF Serving: SetMaxMessageSize(kint32max)
SIGNATURE_DEF = "signature_def"

Response = TypeVar("Response")


class _Unparsable:
    """What a request that is not a valid protobuf of its type becomes (see `_LenientRequests`)."""

    def __init__(self, error: str):
        self.error = error


def _lenient(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as e:  # grpc would answer INTERNAL "Exception deserializing request!"
            return _Unparsable(f"{type(e).__name__}: {e}")

    return parse


class _LenientHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler):
        self.inner = inner

    def service(self, handler_call_details):
        handler = self.inner.service(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_lenient(handler.request_deserializer))


class _LenientRequests:
    """Stands in for the grpc.Server when the generated add_*_to_server functions register a
    service: bytes that do not parse as the request message reach the servicer as `_Unparsable`,
    which `_answer` turns into INVALID_ARGUMENT instead of grpc's INTERNAL."""

    def __init__(self, server: grpc.Server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(tuple(_LenientHandler(h) for h in handlers))

    def __getattr__(self, name: str):  # anything else generated code may call (e.g. add_registered_method_handlers)
        return getattr(self.server, name)


def _answer(context: grpc.ServicerContext, method: str, handler: Callable[[], Response], request=None,
            metrics: Metrics | None = None, api: str = "") -> Response:
    """Run a handler; ServingError keeps its code, anything else is INTERNAL and logged. With
    `metrics`, the call is counted under its model and status, as TF Serving counts it."""
    started, code = time.perf_counter(), grpc.StatusCode.OK
    try:
        if isinstance(request, _Unparsable):
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, f"{method}: the request is not a valid protobuf message of its type ({request.error})")
        try:
            return handler()
        except ServingError as e:
            code = e.code
            log.debug("%s: %s: %s", method, e.code.name, e.message)
            context.abort(e.code, e.message)
        except Exception as e:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            context.abort(code, f"{method}: internal error: {type(e).__name__}: {e}")
    finally:
        if metrics is not None:
            model = "" if isinstance(request, _Unparsable) else request.model_spec.name
            metrics.request(model, code.name, api, "GRPC", time.perf_counter() - started)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over a ModelRegistry, optionally through a Batcher."""

    def __init__(self, registry: ModelRegistry, batcher: Batcher | None = None,
                 max_tensor_bytes: int = MAX_MESSAGE_BYTES, tensor_content: bool = False,
                 metrics: Metrics | None = None):
        self.registry = registry
        self.batcher = batcher
        self.max_tensor_bytes = max_tensor_bytes
        self.tensor_content = tensor_content
        self.metrics = metrics
        self.abandoned = 0  # requests whose caller was gone (deadline, cancel) before the model ran

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        return _answer(context, "Predict", lambda: self._predict(request, context), request, self.metrics, "Predict")

    def _abandon_if_gone(self, context: grpc.ServicerContext) -> None:
        """Do no work for a caller that is gone: its deadline passed or it cancelled the call."""
        if not context.is_active():
            self.abandoned += 1
            log.info("Predict: the caller is gone (deadline exceeded or cancelled); the model is not run")
            raise ServingError(
                grpc.StatusCode.CANCELLED, "the call was cancelled or its deadline passed before the model ran"
            )

    def _predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        self._abandon_if_gone(context)  # it may have waited for a worker thread
        version, signature, result = self.predict(request, context.is_active, lambda: self._abandon_if_gone(context))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version.version
        response.model_spec.signature_name = signature.name
        for name, value in result.items():
            response.outputs[name].CopyFrom(encode_tensor(value, self.tensor_content))
        return response

    def predict(
        self,
        request: predict_pb2.PredictRequest,
        is_active: Callable[[], bool] = lambda: True,
        before_run: Callable[[], None] = lambda: None,
    ) -> tuple[ModelVersion, Signature, dict[str, np.ndarray]]:
        """Check and run one PredictRequest (through the batcher when on): the path gRPC and REST share."""
        version = self.registry.resolve(request.model_spec)
        signature = version.signature(request.model_spec.signature_name)
        outputs = signature.check_output_filter(request.output_filter)
        inputs, size = signature.decode_inputs(request.inputs, self.max_tensor_bytes)
        before_run()
        batched = self.batcher is not None and signature.batchable
        if batched and size is None:  # what TF Serving's batching checks before it queues a request
            scalar = any(array.ndim == 0 for array in inputs.values())
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Batching Run() input tensors must have "
                + ("at least one dimension" if scalar else "equal 0th-dimension size"),
            )
        if batched and size:
            key = (version.model_name, version.version, signature.name, outputs)
            result = self.batcher.submit(
                key, lambda batch: signature.run(batch, outputs), inputs, size, is_active=is_active
            )
        else:
            result = signature.run(inputs, outputs)
        if self.metrics is not None and signature.explains and size:
            self.metrics.heatmap_count.labels(version.model_name, signature.name).inc(size)
        return version, signature, result

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return _answer(
            context, "GetModelMetadata", lambda: self.metadata(request), request, self.metrics, "GetModelMetadata"
        )

    def metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.metadata_field:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != SIGNATURE_DEF:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        version = self.registry.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version.version
        response.metadata[SIGNATURE_DEF].Pack(version.signature_defs)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus (every version the server knows, newest first) and HandleReloadConfigRequest."""

    def __init__(self, registry: ModelRegistry, reload: Callable[[model_server_config_pb2.ModelServerConfig], None]):
        self.registry = registry
        self.reload = reload

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return _answer(context, "GetModelStatus", lambda: model_status(self.registry, request.model_spec), request)

    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        def reload() -> model_management_pb2.ReloadConfigResponse:
            self.reload(request.config)
            return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))

        return _answer(context, "HandleReloadConfigRequest", reload, request)


def model_status(registry: ModelRegistry, spec: model_pb2.ModelSpec) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus's answer, shared by gRPC and REST."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state in registry.states(spec):
        response.model_version_status.add(
            version=version,
            state=get_model_status_pb2.ModelVersionStatus.State.Value(state.state),
            status=status_pb2.StatusProto(error_code=state.code.value[0], error_message=state.message),
        )
    return response


@dataclasses.dataclass
class ServerOptions:
    """What the command line sets (names as tensorflow_model_server's flags)."""

    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int = 0  # 0: no REST port, as in TF Serving
    rest_api_num_threads: int | None = None  # None: 4 per CPU, as TF Serving
    rest_api_timeout_in_ms: int = 30000
    rest_api_enable_cors_support: bool = False
    monitoring: object | None = None  # configs.MonitoringConfig
    grpc_max_threads: int | None = None  # None: default_grpc_threads()
    max_message_bytes: int = MAX_MESSAGE_BYTES
    enable_model_warmup: bool = True
    session_config: bytes = b""  # serialized tensorflow.ConfigProto of the models' sessions (default: TensorFlow's)
    file_system_poll_wait_seconds: float = 1
    model_config_file: str = ""  # re-read every model_config_file_poll_wait_seconds (> 0)
    model_config_file_poll_wait_seconds: float = 0
    models_root: str = "models"  # where /models base paths are read from on a machine without /models
    batching: BatchingOptions | None = None
    tensor_content: bool = False
    ssl: object | None = None  # configs.SSLConfig
    shutdown_grace_seconds: float = 30
    max_concurrent_requests: int = 0  # more calls at once are refused with RESOURCE_EXHAUSTED; 0: no limit
    rerun_failed_batches: bool = False  # not TF Serving's: rerun a failed batch one request at a time
    start_with_failed_models: bool = False  # not TF Serving's: serve the others when a model fails to load


class StartupError(Exception):
    """The server cannot start (TF Serving: "Failed to start server. Error: ...")."""


def _credentials(ssl) -> grpc.ServerCredentials:
    """TLS from an SSLConfig (PEM text in the fields, as in TF Serving's --ssl_config_file)."""
    if not ssl.server_key or not ssl.server_cert:
        raise ValueError("ssl config: server_key and server_cert (PEM contents) are required")
    if ssl.client_verify and not ssl.custom_ca:
        raise ValueError(
            "ssl config: client_verify needs custom_ca, the PEM of the CA that signs the client certificates"
        )
    return grpc.ssl_server_credentials(
        [(ssl.server_key.encode(), ssl.server_cert.encode())],
        root_certificates=ssl.custom_ca.encode() or None,
        require_client_auth=ssl.client_verify,
    )


# Cap for the batching share: TF Serving's default max_batch_size (no parameters file) is 1000.
MAX_BATCH_WAITING_THREADS = 256


def default_grpc_threads(batching: BatchingOptions | None, cpus: int | None = None) -> int:
    """TF Serving's 4 per CPU, plus, with batching, enough to fill every batch twice over.

    A request waiting in the batch queue holds its gRPC worker thread. With only 4 per CPU (8 on
    two cores), at most 8 requests are ever in the server, so while one batch of 8 runs no request
    can queue for the next and batches go out short (measured: 7.6 instead of 12.5 images/s at
    concurrency 16 on two cores). A waiting thread costs no CPU, so each batch thread gets room for
    its running batch and a full one queued behind it.
    """
    threads = 4 * (cpus or os.cpu_count() or 1)
    if batching is not None:
        threads += min(2 * batching.num_batch_threads * batching.execution_batch_size, MAX_BATCH_WAITING_THREADS)
    return threads


class EmbeddedServer:
    """Registry + optional batcher + gRPC server + optional REST port, started and stopped together."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, options: ServerOptions):
        self.options = options
        prometheus = options.monitoring.prometheus_config if options.monitoring is not None else None
        self.metrics_path = (prometheus.path or DEFAULT_PATH) if prometheus is not None and prometheus.enable else None
        self.metrics = Metrics() if self.metrics_path else None  # nothing recorded that no one can read
        self.registry = ModelRegistry(
            config,
            warmup=options.enable_model_warmup,
            session_config=options.session_config,
            max_bytes=options.max_message_bytes,
            on_load=self.metrics.load_attempt if self.metrics else None,
        )
        if self.metrics:
            self.metrics.watch_states(self.registry.all_states)
        self.batcher: Batcher | None = None
        self.predictions: PredictionServicer | None = None
        self.server: grpc.Server | None = None
        self.rest: RestServer | None = None
        self.port: int | None = None
        self.rest_port: int | None = None
        self._config = config  # the config served, which the config file poll compares the file with
        self._stop = threading.Event()
        self._config_poller: threading.Thread | None = None

    def start(self) -> int:
        """Load the models, then listen (as TF Serving: no port opens before the first loads end).

        Returns the bound gRPC port (useful with port 0). A model that fails to load stops the
        start with StartupError, unless `start_with_failed_models`.
        """
        options = self.options
        errors = self.registry.sync()
        if errors and not options.start_with_failed_models:
            self.registry.stop()
            raise StartupError(f"{len(errors)} servable(s) did not become available: {{{'; '.join(errors)}}}")
        self.registry.start_polling(options.file_system_poll_wait_seconds)
        threads = options.grpc_max_threads or default_grpc_threads(options.batching)
        if options.batching is not None:
            on_batch = (
                (lambda rows, padded, waits: self.metrics.batch(rows, padded, waits, "batch_threads"))
                if self.metrics
                else None
            )
            self.batcher = Batcher(options.batching, options.rerun_failed_batches, on_batch=on_batch)
            log.info("batching on: %s; %d gRPC worker threads", options.batching, threads)
        message_options = [
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.max_receive_message_length", options.max_message_bytes),
        ]
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
            options=message_options,
            # Counted from arrival, queued calls included: beyond it, RESOURCE_EXHAUSTED
            # "Concurrent RPC limit exceeded!" at once, before the request is read.
            maximum_concurrent_rpcs=options.max_concurrent_requests or None,
        )
        self.predictions = PredictionServicer(
            self.registry, self.batcher, options.max_message_bytes, options.tensor_content, self.metrics
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            self.predictions, _LenientRequests(self.server)
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.registry, self.reload), _LenientRequests(self.server)
        )
        address = f"{options.host}:{options.port}"
        if options.ssl is not None:
            self.port = self.server.add_secure_port(address, _credentials(options.ssl))
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.server.start()
        log.info("Running gRPC ModelServer at %s:%d%s", options.host, self.port, " (TLS)" if options.ssl else "")
        if options.rest_api_port:
            self._start_rest()
        if options.model_config_file and options.model_config_file_poll_wait_seconds > 0:
            self._config_poller = threading.Thread(target=self._poll_config, name="config-poller", daemon=True)
            self._config_poller.start()
        return self.port

    def _start_rest(self) -> None:
        options = self.options
        if options.rest_api_port == self.port:
            raise StartupError(
                "server_options.http_port cannot be same as grpc_port. Please use a different port for HTTP/REST API."
            )
        api = RestApi(
            self.registry,
            self.predictions,
            model_status,
            self.metrics,
            self.metrics_path,
            options.rest_api_timeout_in_ms / 1000,
        )
        self.rest = RestServer(
            options.host,
            options.rest_api_port,
            api,
            options.rest_api_num_threads or 4 * (os.cpu_count() or 1),
            options.max_message_bytes,
            options.max_concurrent_requests,
            options.rest_api_enable_cors_support,
        )
        self.rest_port = self.rest.start()
        log.info(
            "Exporting HTTP/REST API at:%s:%d%s",
            options.host,
            self.rest_port,
            f" (metrics at {self.metrics_path})" if self.metrics_path else "",
        )

    def reload(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Serve exactly the models of `config` (HandleReloadConfigRequest, the config file poll)."""
        if config.WhichOneof("config") != "model_config_list":
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ServerModelConfig type not supported by "
                "HandleReloadConfigRequest. Only ModelConfigList is currently supported",
            )
        config = configs.localise(config, self.options.models_root)
        errors = self.registry.reload(config)
        self._config = config
        if errors:
            raise ServingError(
                grpc.StatusCode.UNKNOWN, f"{len(errors)} model(s) did not become available: {{{'; '.join(errors)}}}"
            )

    def _poll_config(self) -> None:
        """--model_config_file_poll_wait_seconds: re-read the file, reload when it changed."""
        while not self._stop.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                config = configs.read_model_server_config(self.options.model_config_file)
                if configs.localise(config, self.options.models_root) != self._config:
                    log.info("%s changed: reloading the model config", self.options.model_config_file)
                    self.reload(config)
            except (OSError, ValueError) as e:
                log.error("Failed to read ModelServerConfig file: %s", e)
            except ServingError as e:
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", e.message)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish (up to `grace` seconds), then stop."""
        grace = self.options.shutdown_grace_seconds if grace is None else grace
        self._stop.set()
        if self.rest is not None:
            self.rest.stop()
        if self.server is not None:
            self.server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.stop()
        self.registry.stop()


def serve(config: model_server_config_pb2.ModelServerConfig, options: ServerOptions) -> int:
    """Run until SIGTERM or SIGINT, then shut down cleanly; returns the exit status."""
    stop = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    server = EmbeddedServer(config, options)
    try:
        server.start()
    except (StartupError, OSError) as e:
        log.error("Failed to start server. Error: %s", e)
        return 255
    gpus = tensorflow_gpus()
    log.info("TensorFlow computes on %s", ", ".join(gpus) if gpus else "the CPU: it sees no GPU (so a \"failed "
             "call to cuInit\" line from TensorFlow above only means that this host has no NVIDIA driver)")
    while not stop.wait(1.0):
        pass
    log.info(
        "%s received: finishing in-flight requests (up to %.0f s), then exiting",
        received[0],
        options.shutdown_grace_seconds,
    )
    server.stop()
    log.info("stopped")
    return 0
