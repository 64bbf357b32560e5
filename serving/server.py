"""The embedded server: TF Serving's gRPC API (PredictionService, ModelService) without TF Serving.

For machines without the tensorflow_model_server binary (development, CI, laptops). It serves the
same SavedModel directories with the same `models.config`, answers with the same status codes and
the same response encoding, so a client cannot tell it from TF Serving. Implemented: Predict,
GetModelMetadata (signature_def), GetModelStatus; the other RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
from typing import Callable, TypeVar

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving.batching import Batcher
from serving.configs import BatchingOptions
from serving.models import ModelRegistry, ServingError, encode_tensor

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


def _answer(context: grpc.ServicerContext, method: str, handler: Callable[[], Response], request=None) -> Response:
    """Run a handler; ServingError keeps its code, anything else is INTERNAL and logged."""
    if isinstance(request, _Unparsable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request is not a valid protobuf message "
                      f"of its type ({request.error})")
    try:
        return handler()
    except ServingError as e:
        log.debug("%s: %s: %s", method, e.code.name, e.message)
        context.abort(e.code, e.message)
    except Exception as e:
        log.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error: {type(e).__name__}: {e}")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over a ModelRegistry, optionally through a Batcher."""

    def __init__(self, registry: ModelRegistry, batcher: Batcher | None = None,
                 max_tensor_bytes: int = MAX_MESSAGE_BYTES, tensor_content: bool = False):
        self.registry = registry
        self.batcher = batcher
        self.max_tensor_bytes = max_tensor_bytes
        self.tensor_content = tensor_content
        self.abandoned = 0  # requests whose caller was gone (deadline, cancel) before the model ran

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        return _answer(context, "Predict", lambda: self._predict(request, context), request)

    def _abandon_if_gone(self, context: grpc.ServicerContext) -> None:
        """Do no work for a caller that is gone: its deadline passed or it cancelled the call."""
        if not context.is_active():
            self.abandoned += 1
            log.info("Predict: the caller is gone (deadline exceeded or cancelled); the model is not run")
            raise ServingError(grpc.StatusCode.CANCELLED, "the call was cancelled or its deadline passed before the model ran")

    def _predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        self._abandon_if_gone(context)  # it may have waited for a worker thread
        version = self.registry.resolve(request.model_spec)
        signature = version.signature(request.model_spec.signature_name)
        outputs = signature.check_output_filter(request.output_filter)
        inputs, size = signature.decode_inputs(request.inputs, self.max_tensor_bytes)
        self._abandon_if_gone(context)
        batched = self.batcher is not None and signature.batchable
        if batched and size is None:  # what TF Serving's batching checks before it queues a request
            scalar = any(array.ndim == 0 for array in inputs.values())
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Batching Run() input tensors must have "
                               + ("at least one dimension" if scalar else "equal 0th-dimension size"))
        if batched and size:
            key = (version.model_name, version.version, signature.name, outputs)
            result = self.batcher.submit(key, lambda batch: signature.run(batch, outputs), inputs, size,
                                         is_active=context.is_active)
        else:
            result = signature.run(inputs, outputs)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version.version
        response.model_spec.signature_name = signature.name
        for name, value in result.items():
            response.outputs[name].CopyFrom(encode_tensor(value, self.tensor_content))
        return response

    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                         context: grpc.ServicerContext) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return _answer(context, "GetModelMetadata", lambda: self._metadata(request), request)

    def _metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.metadata_field:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
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
    """GetModelStatus: every loaded version is AVAILABLE (HandleReloadConfigRequest: UNIMPLEMENTED)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                       context: grpc.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        def status() -> get_model_status_pb2.GetModelStatusResponse:
            response = get_model_status_pb2.GetModelStatusResponse()
            for version in self.registry.available(request.model_spec):
                response.model_version_status.add(
                    version=version.version, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE
                )
            return response

        return _answer(context, "GetModelStatus", status, request)


@dataclasses.dataclass
class ServerOptions:
    """What the command line sets (names as tensorflow_model_server's flags)."""

    host: str = "127.0.0.1"
    port: int = 8500
    grpc_max_threads: int | None = None  # None: default_grpc_threads()
    max_message_bytes: int = MAX_MESSAGE_BYTES
    enable_model_warmup: bool = True
    file_system_poll_wait_seconds: float = 1
    batching: BatchingOptions | None = None
    tensor_content: bool = False
    ssl: object | None = None  # configs.SSLConfig
    shutdown_grace_seconds: float = 30
    max_concurrent_requests: int = 0  # more calls at once are refused with RESOURCE_EXHAUSTED; 0: no limit
    rerun_failed_batches: bool = False  # not TF Serving's: rerun a failed batch one request at a time


def _credentials(ssl) -> grpc.ServerCredentials:
    """TLS from an SSLConfig (PEM text in the fields, as in TF Serving's --ssl_config_file)."""
    if not ssl.server_key or not ssl.server_cert:
        raise ValueError("ssl config: server_key and server_cert (PEM contents) are required")
    if ssl.client_verify and not ssl.custom_ca:
        raise ValueError("ssl config: client_verify needs custom_ca, the PEM of the CA that signs the client certificates")
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
    """Registry + optional batcher + gRPC server, started and stopped together."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, options: ServerOptions):
        self.options = options
        self.registry = ModelRegistry(config, warmup=options.enable_model_warmup, max_bytes=options.max_message_bytes)
        self.batcher: Batcher | None = None
        self.predictions: PredictionServicer | None = None
        self.server: grpc.Server | None = None
        self.port: int | None = None

    def start(self) -> int:
        """Load the models, then listen; returns the bound port (useful with port 0)."""
        options = self.options
        self.registry.sync()
        self.registry.start_polling(options.file_system_poll_wait_seconds)
        threads = options.grpc_max_threads or default_grpc_threads(options.batching)
        if options.batching is not None:
            self.batcher = Batcher(options.batching, options.rerun_failed_batches)
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
        self.predictions = PredictionServicer(self.registry, self.batcher, options.max_message_bytes, options.tensor_content)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self.predictions, _LenientRequests(self.server))
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.registry), _LenientRequests(self.server))
        address = f"{options.host}:{options.port}"
        if options.ssl is not None:
            self.port = self.server.add_secure_port(address, _credentials(options.ssl))
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.server.start()
        log.info("Running gRPC ModelServer at %s:%d%s", options.host, self.port, " (TLS)" if options.ssl else "")
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish (up to `grace` seconds), then stop."""
        grace = self.options.shutdown_grace_seconds if grace is None else grace
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
    server.start()
    while not stop.wait(1.0):
        pass
    log.info("%s received: finishing in-flight requests (up to %.0f s), then exiting", received[0], options.shutdown_grace_seconds)
    server.stop()
    log.info("stopped")
    return 0
