"""gRPC calls of the tests, written with TF Serving's own messages (not the thin client's):
requests, outputs as arrays, the error a call must raise, and waiting for a condition."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc


def model_spec(name: str, version: int | None = None, label: str = "", signature: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature, version_label=label)
    if version is not None:
        spec.version.value = version
    return spec


def predict_request(model: str, signature: str, inputs: dict, version: int | None = None, label: str = "",
                    output_filter=()) -> predict_pb2.PredictRequest:
    """`inputs`: name -> array (or a ready TensorProto, for malformed ones)."""
    request = predict_pb2.PredictRequest(model_spec=model_spec(model, version, label, signature),
                                         output_filter=list(output_filter))
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(
            value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        )
    return request


def explain_request(
    model: str, images: np.ndarray, classes=None, signature: str = "gradcam"
) -> predict_pb2.PredictRequest:
    """`images` [N,H,W,3] uint8 to an explain signature; classes default to -1 (the predicted one)."""
    classes = np.full(len(images), -1, np.int32) if classes is None else np.asarray(classes, np.int32)
    return predict_request(model, signature, {"images": images, "class_index": classes})


def bytes_request(model: str, blobs: list[bytes], classes=None, signature: str = "gradcam_bytes"):
    classes = np.full(len(blobs), -1, np.int32) if classes is None else np.asarray(classes, np.int32)
    return predict_request(model, signature, {"image_bytes": np.array(blobs, dtype=object), "class_index": classes})


def arrays(response) -> dict[str, np.ndarray]:
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def rpc_error(call, request, timeout: float = 60) -> grpc.RpcError:
    """The error `call(request)` must raise."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    return info.value


def wait_for(condition: Callable[[], bool], timeout: float = 10, interval: float = 0.02) -> bool:
    """Whether `condition()` became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def fake_server(servicer: prediction_service_pb2_grpc.PredictionServiceServicer, **options) -> tuple[grpc.Server, int]:
    """A started gRPC server with `servicer` as its PredictionService, and its port."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), **options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def run_method(session, method: str, inputs: dict, outputs=()) -> dict[str, np.ndarray]:
    """`method`'s outputs under TF Serving's loader (a SavedModelSession) through its family, `explain` or
    `explain_bytes` with the method in every row: the numbers of `<method>`/`<method>_bytes`, and one
    executor for every method a test runs instead of one each (tests/test_every_signature.py runs each
    of those signatures alone)."""
    kind = "image_bytes" if "image_bytes" in inputs else "images"
    rows = len(inputs[kind])
    family = "explain_bytes" if kind == "image_bytes" else "explain"
    return session.run_signature(family, {**inputs, "method": np.array([method] * rows, dtype=object)}, outputs)
