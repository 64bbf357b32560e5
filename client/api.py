"""Python API: send images to a TensorFlow Serving model exported by `export/`, get labels and heatmaps.

Encoded files (JPEG/PNG/BMP bytes, or a path) go as-is to `explain_bytes` (each row naming its method)
or `predict_bytes`, which decode and resize them in the graph; uint8 RGB arrays go the same way as BMP
files (client/bmp.py), so that every call runs on an executor the server's warm-up built
(client/outputs.py).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import grpc
import numpy as np

from . import bmp, protos
from .channel import channel_options as _channel_options
from .channel import grpc_target
from .outputs import (
    EXPLAIN_BYTES,
    HEATMAP_PNG,
    PREDICT,
    SUMMARY,
    default_outputs,
    explained_methods,
    picture_name,
    pictures,
)

Image = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # gRPC's 4 MiB default fails at ~80 float heatmaps
_HEATMAP_OUTPUT = {"png": HEATMAP_PNG, "uint8": "heatmap_uint8", "float": "heatmap", "none": None}


class CamServingError(RuntimeError):
    """A failed call, with the gRPC status `code` (grpc.StatusCode) and the server's `details`."""

    def __init__(self, code: grpc.StatusCode, details: str, context: str = ""):
        self.code, self.details = code, details
        super().__init__(f"{code.name}: {details}" + (f" ({context})" if context else ""))


@dataclass
class Prediction:
    """One image's prediction. `top_k` is [(label, probability)], most probable first;
    `score` is the logit of `class_index`. `outputs` holds this image's raw output arrays."""
    top_k: list[tuple[str, float]]
    class_index: int
    class_label: str
    score: float
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass
class Explanation(Prediction):
    """A prediction plus the heatmap of `class_index`: float32 H×W in [0, 1] at the model input
    size (None when not requested); and the method's pictures of its own, by name, each uint8 RGB
    H×W×3 (Guided Grad-CAM's `guided`, from `guided_png_bytes`; none for most methods)."""
    heatmap: np.ndarray | None = field(default=None, repr=False)
    pictures: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of `CamClient` itself, for outages longer than the channel's gRPC retries cover.

    The channel already retries UNAVAILABLE and RESOURCE_EXHAUSTED (up to 5 attempts within ~1.5 s,
    on another replica, throttled when most calls fail: client/channel.py), so by default CamClient
    adds none: two layers would multiply into 15 attempts per call against an overloaded server. Pass e.g.
    `RetryPolicy(max_attempts=3)` to also ride out a restart. Only idempotent calls are retried
    (Predict of the exported signatures, GetModelMetadata). Attempt n (from 1) waits
    min(max_backoff, initial_backoff * multiplier**(n-1)) seconds, times a random 0.5..1 (jitter),
    before the next; `max_attempts` counts the first try (1: never retry)."""
    max_attempts: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    multiplier: float = 2.0
    codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))


NO_RETRY = RetryPolicy(max_attempts=1)


def _decode(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class CamClient:
    """gRPC client of `tensorflow.serving.PredictionService` for one model.

    `target` is a gRPC address: "host:8500", several replicas as "host:8500,host2:8500" or
    "ipv4:10.0.0.1:8500,10.0.0.2:8500", or a name whose addresses are the replicas,
    "dns:///camserve.default.svc.cluster.local:8500" (see client/channel.py). Calls are spread
    round-robin over the replicas and retried on another one when they fail with UNAVAILABLE or
    RESOURCE_EXHAUSTED (an overloaded server);
    `channel_options` replace the defaults of the same name (client.channel.DEFAULT_OPTIONS);
    `timeout` is the deadline of each call in seconds; `version` pins a model version;
    `retry` (a RetryPolicy; default none beyond the channel's own) retries calls that fail with
    UNAVAILABLE or RESOURCE_EXHAUSTED.
    `credentials`: e.g. `tls_credentials(ca_cert=..., client_cert=..., client_key=...)` for TLS.
    """

    def __init__(self, target: str = "localhost:8500", model: str = "efficientnet_lite0_cam", timeout: float = 30.0,
                 version: int | None = None, *, credentials: grpc.ChannelCredentials | None = None,
                 image_size: tuple[int, int] | None = None, batch_size: int = 8,
                 channel_options: Sequence[tuple[str, object]] = (), retry: RetryPolicy | None = None):
        options = _channel_options([("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *channel_options])
        self.target, self.model, self.timeout, self.version = target, model, timeout, version
        self.batch_size = batch_size
        self.retry = NO_RETRY if retry is None else retry
        self._image_size = image_size  # (height, width) for arrays; asked from the server when None
        self._defs = None  # the model's SignatureDefs, asked once (again when a method is not among them)
        address = grpc_target(target)
        self._channel = (grpc.secure_channel(address, credentials, options) if credentials
                         else grpc.insecure_channel(address, options))
        self._predict = self._channel.unary_unary(
            protos.PREDICT_METHOD, request_serializer=protos.PredictRequest.SerializeToString,
            response_deserializer=protos.PredictResponse.FromString)
        self._metadata = self._channel.unary_unary(
            protos.METADATA_METHOD, request_serializer=protos.GetModelMetadataRequest.SerializeToString,
            response_deserializer=protos.GetModelMetadataResponse.FromString)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CamClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def explain(self, images: Image | Sequence[Image], method: str = "gradcam",
                class_index: int | Sequence[int] | None = None, top_k: int | None = None,
                outputs: Sequence[str] = (), heatmap: str = "png") -> Explanation | list[Explanation]:
        """Explain one image (returns an Explanation) or a list / N×H×W×3 batch (returns a list).

        `class_index`: the class to explain, per image or for all; None explains the top-1 class.
        `top_k` keeps the first k of the model's top-k. `heatmap`: "png" fetches the compact
        `heatmap_png_bytes` (8-bit, ~10-25 KB a 224×224 map on the wire), "uint8" the `heatmap_uint8`
        tensor (same values, ~100 KB as TF Serving encodes it), "float" the float32 `heatmap`,
        "none" neither. The method's pictures of its own come too.
        `outputs` names extra outputs to fetch into `.outputs` (e.g. "heatmap_lowres", "logits"); any
        output set but the default one costs an executor build on the server at its first call.
        """
        if heatmap not in _HEATMAP_OUTPUT:
            raise ValueError(f"heatmap must be one of {sorted(_HEATMAP_OUTPUT)}, not {heatmap!r}")
        signature, row_method = self._explain_signature(method)
        own = pictures(self._signature_defs()[signature].outputs)
        wanted = _unique([*SUMMARY, _HEATMAP_OUTPUT[heatmap], *own, *outputs])
        return self._run(images, signature, wanted, class_index, top_k, Explanation, row_method)

    def predict(self, images: Image | Sequence[Image], top_k: int | None = None,
                outputs: Sequence[str] = ()) -> Prediction | list[Prediction]:
        """Classify without explaining: `explain_bytes` with the method `predict`, which computes no map
        (and so runs on the server's one warm executor: client/outputs.py), or `predict_bytes` on a
        model exported without it."""
        defs = self._signature_defs()
        if EXPLAIN_BYTES not in defs:
            return self._run(images, "predict_bytes", _unique([*SUMMARY, *outputs]), None, top_k, Prediction)
        wanted = _unique([*default_outputs(defs[EXPLAIN_BYTES].outputs), *outputs])
        return self._run(images, EXPLAIN_BYTES, wanted, None, top_k, Prediction, PREDICT)

    def call(self, signature: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Any signature with numpy inputs (strings as object arrays of bytes); all outputs, or
        only `outputs`. The building block for feature maps and the quality metrics."""
        request = protos.PredictRequest(output_filter=list(outputs))
        request.model_spec.CopyFrom(self._spec(signature))
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(protos.make_tensor(value))
        response = self._call(self._predict, request, f"{signature} of")
        return {name: protos.to_numpy(t) for name, t in response.outputs.items()}

    def feature_maps(self, image: Image) -> tuple[np.ndarray, np.ndarray]:
        """The debug view of `feature_maps` for one image: the most activated channels of the
        target layer, as (maps F×h×w in [0, 1], channel numbers F)."""
        out = self.call("feature_maps_bytes", {"image_bytes": np.array([_read(image)], dtype=object)})
        return out["feature_maps"][0], out["feature_channels"][0]

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Block until the server answers for this model: a server that is still starting or
        loading (UNAVAILABLE, NOT_FOUND) is retried until `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        request = self._metadata_request()
        while True:
            try:
                self._call(self._metadata, request, "GetModelMetadata", retry=NO_RETRY)  # retried below
                return
            except CamServingError as err:
                retry = err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
                if not retry or time.monotonic() > deadline:
                    raise
            time.sleep(interval)

    def explain_methods(self) -> list[str]:
        """The methods this model explains with (gradcam, cam, ...), from its signature metadata."""
        return explain_methods(self._signature_defs(refresh=True))

    def method_pictures(self) -> dict[str, list[str]]:
        """Each method this model explains with and the outputs of its pictures besides the heatmap
        (`guided_gradcam: ["guided_png_bytes"]`, most: none), from its signature metadata."""
        return method_pictures(self._signature_defs(refresh=True))

    def _explain_signature(self, method: str) -> tuple[str, str | None]:
        """The signature that explains with `method` and the `method` it is sent (client/outputs.py)."""
        signatures = explained_methods(self._signature_defs())
        if method not in signatures:  # the model may have gained methods since it was asked
            signatures = explained_methods(self._signature_defs(refresh=True))
        if method not in signatures:
            raise CamServingError(grpc.StatusCode.FAILED_PRECONDITION, f"model {self.model!r} has no method "
                                  f"{method!r}; it has {', '.join(signatures)}")
        return signatures[method]

    def model_image_size(self, signature: str = "predict") -> tuple[int, int]:
        """(height, width) of the `images` input, from the server's signature metadata."""
        if self._image_size is None:
            try:
                signatures = self._signature_defs()
            except CamServingError as err:
                raise CamServingError(err.code, f"{err.details}; cannot learn the input size of {self.model!r}: "
                                      "pass image_size=(H, W) (CLI: --image-size)") from None
            if signature not in signatures or "images" not in signatures[signature].inputs:
                raise CamServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"model {self.model!r} has no signature {signature!r} with an 'images' input")
            dims = [d.size for d in signatures[signature].inputs["images"].tensor_shape.dim]
            if len(dims) != 4 or min(dims[1:3]) <= 0:
                raise CamServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"'images' of {signature!r} has shape {dims}, not [N,H,W,3]")
            self._image_size = (dims[1], dims[2])
        return self._image_size

    # -- internals -------------------------------------------------------------------------------
    def _metadata_request(self):
        request = protos.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(self._spec(""))
        return request

    def _signature_defs(self, refresh: bool = False):
        """name -> SignatureDef of the served model (GetModelMetadata), asked once, and again on `refresh`."""
        if self._defs is None or refresh:
            request = self._metadata_request()
            any_msg = self._call(self._metadata, request, "GetModelMetadata").metadata["signature_def"]
            self._defs = protos.SignatureDefMap.FromString(any_msg.value).signature_def
        return self._defs

    def _spec(self, signature: str):
        spec = protos.ModelSpec(name=self.model, signature_name=signature)
        if self.version is not None:
            spec.version.value = int(self.version)
        return spec

    def _call(self, method, request, what: str, idempotent: bool = True, retry: RetryPolicy | None = None):
        """One call with the deadline `self.timeout`; an idempotent one is retried per `retry`
        (default `self.retry`). Failures become CamServingError."""
        policy = retry or self.retry
        attempts = policy.max_attempts if idempotent else 1
        for attempt in range(1, max(1, attempts) + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as err:
                code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
                details = err.details() if callable(getattr(err, "details", None)) else str(err)
                if code in policy.codes and attempt < attempts:
                    time.sleep(policy.backoff(attempt) * random.uniform(0.5, 1.0))
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    details = f"{details} (timeout {self.timeout} s)"
                if attempt > 1:
                    details = f"{details} (after {attempt} attempts)"
                raise CamServingError(code, details or "", f"{what} {self.model!r} at {self.target}") from None

    def _run(self, images, signature, wanted, class_index, top_k, kind, method: str | None = None):
        """Call `signature` (a `_bytes` one) in chunks of `batch_size` images; `method` fills its
        `method` input (explain_bytes)."""
        batch4d = isinstance(images, np.ndarray) and images.ndim == 4
        single = not isinstance(images, (list, tuple)) and not batch4d
        items = [images] if single else list(images)
        if not items:
            raise ValueError("no images given")
        if class_index is None or isinstance(class_index, (int, np.integer)):
            classes = [-1 if class_index is None else int(class_index)] * len(items)
        else:
            classes = [int(c) for c in class_index]
        if len(classes) != len(items):
            raise ValueError(f"{len(classes)} class indices for {len(items)} images")
        results: list = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            request = protos.predict_request(
                self._spec(signature), image_bytes=[_read(item) for item in chunk],
                class_index=classes[start:start + len(chunk)] if signature != "predict_bytes" else None,
                method=[method] * len(chunk) if method else None, output_filter=wanted)
            response = self._call(self._predict, request, f"{signature} of")
            got = {name: protos.to_numpy(t) for name, t in response.outputs.items()}
            missing = [name for name in wanted if name not in got]
            if missing or any(v.shape[:1] != (len(chunk),) for v in got.values()):
                raise CamServingError(grpc.StatusCode.INTERNAL, f"bad response: missing {missing}, batch {len(chunk)}")
            _raise_refused(got["error"], dict(enumerate(chunk, start)))
            results += [_parse({k: v[row] for k, v in got.items()}, top_k, kind) for row in range(len(chunk))]
        return results[0] if single else results


def method_pictures(signature_defs: Mapping) -> dict[str, list[str]]:
    """The explain methods among SignatureDefs (name -> SignatureDef), sorted (client/outputs.py
    `explained_methods`), with the picture outputs each one's own signature declares."""
    return {method: pictures(signature_defs[f"{method}_bytes"].outputs) for method in explained_methods(signature_defs)}


def explain_methods(signature_defs: Mapping) -> list[str]:
    """The explain methods among SignatureDefs (name -> SignatureDef), sorted."""
    return list(method_pictures(signature_defs))


PEM = str | os.PathLike | bytes  # a PEM file's path, or its contents


def tls_credentials(ca_cert: PEM | None = None, client_cert: PEM | None = None,
                    client_key: PEM | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files or PEM bytes: `ca_cert` verifies the server (None: the
    system's roots); `client_cert` and `client_key` (both or neither) identify the client to a server
    that requires client certificates (mutual TLS, TF Serving's `client_verify`)."""
    if bool(client_cert) != bool(client_key):
        raise ValueError("give both a client certificate and its key, or neither")

    def read(pem: PEM | None) -> bytes | None:
        if not pem or isinstance(pem, bytes):
            return pem or None
        with open(pem, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_cert), private_key=read(client_key), certificate_chain=read(client_cert)
    )


def _read(item) -> bytes:
    """Encoded image bytes, sent unchanged (the server decodes them, the client never re-encodes); an
    array as a BMP file."""
    if isinstance(item, np.ndarray):
        return bmp.encode(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        with open(item, "rb") as f:
            return f.read()
    raise TypeError(f"an image must be a path, encoded bytes or a uint8 array, not {type(item).__name__}")


def _unique(names: Sequence[str | None]) -> list[str]:
    """The names, in order, once each (None dropped)."""
    return [n for n in dict.fromkeys(names) if n]


def _raise_refused(errors: np.ndarray, items: dict[int, Image]) -> None:
    """The server computes a batch even when some of its images are refused (so that one caller's
    bad image does not fail the others batched with it) and says why in the `error` output; a
    refused image is an INVALID_ARGUMENT for this caller, as when the server refuses the whole call."""
    refused = [f"image {i}{f' ({item})' if isinstance(item, (str, os.PathLike)) else ''}: {_decode(error)}"
               for (i, item), error in zip(items.items(), errors) if error]
    if refused:
        raise CamServingError(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(refused))


def _parse(out: dict[str, np.ndarray], top_k: int | None, kind):
    k = len(out["top_k_labels"]) if top_k is None else top_k
    pairs = [(_decode(label), float(score))
             for label, score in zip(out["top_k_labels"][:k], out["top_k_scores"][:k])]
    result = kind(top_k=pairs, class_index=int(out["class_index"]), class_label=_decode(out["class_label"]),
                  score=float(out["score"]), outputs=out)
    if kind is Explanation:
        if "heatmap" in out:
            result.heatmap = out["heatmap"].astype(np.float32)
        elif "heatmap_uint8" in out:
            result.heatmap = out["heatmap_uint8"].astype(np.float32) / np.float32(255.0)
        elif HEATMAP_PNG in out:
            result.heatmap = _png(out[HEATMAP_PNG]).astype(np.float32) / np.float32(255.0)
        result.pictures = {picture_name(o): _png(out[o], colour=True)[:, :, ::-1]  # OpenCV's BGR -> RGB
                           for o in pictures(out) if len(out[o])}  # "" in the rows of other methods
    return result


def _png(data, colour: bool = False) -> np.ndarray:
    import cv2  # only decoded pictures need it; `import client` stays light

    return cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR if colour else cv2.IMREAD_UNCHANGED)
