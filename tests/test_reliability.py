"""Hostile input, faults, versions and TLS against the embedded server (issue "Reliability and security").

One `python -m serving` subprocess (`served`, batching on, 4 MiB message limit) takes the hostile
requests, the decompression bombs (its RSS is measured with psutil), the fuzzer and finally a
SIGTERM under load; in-process `EmbeddedServer`s cover what needs a look inside: deadlines, the
concurrency limit, version switching and mutual TLS. The long load test is tests/test_load.py.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import pathlib
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from calls import arrays, bytes_request, explain_request, fake_server, model_spec, predict_request, wait_for
from camserve.serving import configs
from camserve.serving.__main__ import options_from_args, parser
from camserve.serving.server import EmbeddedServer, ServerOptions
from images import bmp_claiming, encode, gif, jpeg_claiming, png_bomb, random_images
from servers import ServerProcess, from_flags
from synthetic import TINY_CLASSES as NUM_CLASSES
from synthetic import TINY_MAX_BATCH as MAX_BATCH
from synthetic import TINY_SIZE as SIZE

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_MESSAGE = 4 * 2**20
# What a hostile request may get back: anything else (INTERNAL, UNKNOWN, UNAVAILABLE, a timeout) is a bug.
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION}


# --- models, servers, requests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_gradcam_model, tmp_path_factory):
    """The subprocess server of the hostile-input tests (batching: 50 ms window, at most MAX_BATCH)."""
    root = tmp_path_factory.mktemp("served")
    (root / "batching.config").write_text(
        f"max_batch_size {{ value: {MAX_BATCH} }}\nallowed_batch_sizes: 1\nallowed_batch_sizes: {MAX_BATCH}\n"
        "batch_timeout_micros { value: 50000 }\nnum_batch_threads { value: 2 }\nmax_enqueued_batches { value: 1000 }\n")
    server = ServerProcess(["--port", "0", "--model_name", "rel", "--model_base_path", str(tiny_gradcam_model),
                     "--enable_batching", "--batching_parameters_file", str(root / "batching.config"),
                     "--max_message_bytes", str(MAX_MESSAGE), "--file_system_poll_wait_seconds", "0",
                     "--shutdown_grace_seconds", "20"])
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.address, options=[("grpc.max_receive_message_length", 64 * 2**20)]) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def assert_serves(stub, tiny_gradcam_reference, seed: int = 99) -> None:
    """A valid request works and answers exactly what the in-process call does."""
    images = random_images(2, SIZE, seed)
    response = stub.Predict(explain_request("rel", images), timeout=30)
    expected = tiny_gradcam_reference("gradcam", images=images, class_index=np.array([-1, -1], np.int32))
    np.testing.assert_allclose(arrays(response)["heatmap"], expected["heatmap"], rtol=1e-5, atol=1e-6)


# --- hostile images ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_bomb(16000)
    assert len(data) < 300_000
    return data


def _hostile_images(bomb: bytes) -> dict:
    """name: (encoded image, code, fragment of the message)."""
    image = random_images(1, SIZE, 1)[0]
    jpeg, png = encode(".jpg", image), encode(".png", image)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "not an image": (b"<html>this is not an image</html>", invalid, "not a JPEG, PNG or BMP image"),
        "empty string": (b"", invalid, "empty (0 bytes)"),
        "truncated JPEG": (jpeg[:len(jpeg) // 2], invalid, "cannot be decoded"),
        "JPEG cut in its header": (jpeg[:40], invalid, "cannot be decoded"),
        "truncated PNG": (png[:len(png) // 2], invalid, "cannot be decoded"),
        "PNG bomb 16000x16000": (bomb, invalid, "declares 16000x16000 pixels, more than the limit"),
        "JPEG claiming 60000x60000": (jpeg_claiming(60000, 60000), invalid, "declares 60000x60000 pixels"),
        "BMP claiming 30000x30000": (bmp_claiming(30000, 30000), invalid, "declares 30000x30000 pixels"),
        "BMP without its pixels": (bmp_claiming(400, 400), invalid, "cannot be decoded"),
        "GIF": (gif(image), invalid, "GIF images are not accepted"),
    }


HOSTILE_IMAGES = ["not an image", "empty string", "truncated JPEG", "JPEG cut in its header", "truncated PNG",
                  "PNG bomb 16000x16000", "JPEG claiming 60000x60000", "BMP claiming 30000x30000",
                  "BMP without its pixels", "GIF"]


@pytest.mark.parametrize("case", HOSTILE_IMAGES)
def test_hostile_image_gets_a_clear_error_and_the_next_request_works(stub, tiny_gradcam_reference, bomb, case):
    data, code, fragment = _hostile_images(bomb)[case]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(bytes_request("rel", [data]), timeout=20)
    assert time.monotonic() - started < 5
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    assert len(info.value.details()) < 300 and "[[{{" not in info.value.details()
    # Beside a good image (as in a batch TF Serving forms from several callers): the good one is
    # answered, the bad one's row says why.
    good = random_images(1, SIZE, 2)
    response = stub.Predict(bytes_request("rel", [encode(".png", good[0]), data]), timeout=20)
    errors = tf.make_ndarray(response.outputs["error"])
    assert errors[0] == b"" and fragment in errors[1].decode()
    expected = tiny_gradcam_reference("gradcam", images=good, class_index=np.array([-1], np.int32))["heatmap"]
    np.testing.assert_allclose(arrays(response)["heatmap"][:1], expected, rtol=1e-5, atol=1e-6)
    assert_serves(stub, tiny_gradcam_reference)


def test_image_variants_decode_like_their_rgb_pixels(stub, tiny_gradcam_reference):
    """Grayscale, alpha, 16-bit PNGs and BMPs work, and give the heatmap of the same RGB pixels."""
    image = random_images(1, SIZE, 4)[0]
    gray = image[..., 1]
    gray_rgb = np.repeat(gray[..., None], 3, axis=2)
    cases = {
        "PNG RGBA": (encode(".png", np.dstack([image, np.full(gray.shape, 77, np.uint8)])), image),
        "PNG 16-bit": (encode(".png", image.astype(np.uint16) * 257), image),
        "PNG gray": (encode(".png", gray), gray_rgb),
        "PNG gray 16-bit": (encode(".png", gray.astype(np.uint16) * 257), gray_rgb),
        "BMP": (encode(".bmp", image), image),
        "BMP gray": (encode(".bmp", gray), gray_rgb),
    }
    response = stub.Predict(bytes_request("rel", [data for data, _ in cases.values()]), timeout=30)
    pixels = np.stack([expected for _, expected in cases.values()])
    everyone = np.full(len(cases), -1, np.int32)
    expected = tiny_gradcam_reference("gradcam", images=pixels, class_index=everyone)["heatmap"]
    for i, name in enumerate(cases):
        np.testing.assert_allclose(arrays(response)["heatmap"][i], expected[i], rtol=1e-5, atol=1e-6, err_msg=name)
    jpeg_gray = stub.Predict(bytes_request("rel", [encode(".jpg", gray)]), timeout=30)  # lossy: shape and range only
    gray_map = arrays(jpeg_gray)["heatmap"]
    assert gray_map.shape == (1, SIZE, SIZE) and 0 <= gray_map.min() <= gray_map.max() <= 1


def test_a_burst_of_decompression_bombs_leaves_server_memory_flat(served, stub, tiny_gradcam_reference, bomb):
    """16 bombs at once (each 768 MB if decoded) plus 16 JPEG headers claiming 60000x60000: refused
    from the header, with the server's RSS sampled every 5 ms."""
    assert_serves(stub, tiny_gradcam_reference)
    before = served.rss()
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], served.rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    claims = jpeg_claiming(60000, 60000)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [
            pool.submit(stub.Predict, bytes_request("rel", [bomb if i % 2 else claims]), timeout=30) for i in range(32)
        ]
        errors = [f.exception() for f in futures]
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    after = served.rss()
    print(
        f"bomb burst: RSS before {before / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB, "
        f"after {after / 2**20:.0f} MiB, {elapsed:.2f} s"
    )
    assert all(e is not None and e.code() == grpc.StatusCode.INVALID_ARGUMENT for e in errors)
    assert all("pixels, more than the limit" in e.details() for e in errors)
    assert peak[0] - before < 150 * 2**20  # one decoded bomb alone would be 768 MB
    assert elapsed < 10
    assert_serves(stub, tiny_gradcam_reference)


# --- hostile tensors and requests -------------------------------------------------------------


def _proto(dtype: int, shape: list[int], content: bytes = b"") -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_content=content)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def _hostile_requests() -> dict:
    """name: (request, code, fragment of the message)."""
    good = random_images(2, SIZE, 0)
    classes = np.array([-1, -1], np.int32)
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    nan = good.astype(np.float32)
    nan[0, 0, 0, 0], nan[1, 0, 0, 0] = np.nan, np.inf
    return {
        "wrong dtype": (explain_request("rel", good.astype(np.int32)), invalid, "expected dtype uint8, got int32"),
        "NaN and inf floats": (explain_request("rel", nan), invalid, "expected dtype uint8, got float32"),
        "class_index int64": (
            predict_request("rel", "gradcam", {"images": good, "class_index": classes.astype(np.int64)}),
            invalid,
            "expected dtype int32, got int64",
        ),
        # With batching, TF Serving's batcher refuses these before the graph sees them.
        "wrong rank": (
            predict_request("rel", "gradcam", {"images": good[0], "class_index": classes[:1]}),
            invalid,
            "Batching Run() input tensors must have equal 0th-dimension size",
        ),
        "batch sizes differ": (
            explain_request("rel", good, [-1, -1, -1]),
            invalid,
            "Batching Run() input tensors must have equal 0th-dimension size",
        ),
        "scalar input": (
            predict_request("rel", "gradcam", {"images": good, "class_index": np.int32(-1)}),
            invalid,
            "Batching Run() input tensors must have at least one dimension",
        ),
        # (padded by the batcher to an allowed batch size, as TF Serving pads: "got [8,35,35,3]")
        "wrong image size": (
            explain_request("rel", random_images(2, SIZE + 3, 0)),
            invalid,
            f"images: expected shape [N,{SIZE},{SIZE},3] (N RGB images of {SIZE}x{SIZE}, uint8), "
            f"got [{MAX_BATCH},{SIZE + 3},{SIZE + 3},3]",
        ),
        "class_index = number of classes": (
            explain_request("rel", good, [NUM_CLASSES] * 2),
            invalid,
            f"class_index {NUM_CLASSES} is out of range: this model has {NUM_CLASSES}",
        ),
        "class_index < -1": (explain_request("rel", good, [-2, -2]), invalid, "class_index -2 is out of range"),
        "empty batch": (explain_request("rel", random_images(0, SIZE, 0)), invalid, "empty batch"),
        "batch over the maximum": (
            explain_request("rel", random_images(MAX_BATCH + 1, SIZE, 0)),
            invalid,
            f"maximum input batch size {MAX_BATCH}",
        ),
        "unknown input name": (
            predict_request("rel", "gradcam", {"images": good, "class_index": classes, "mask": classes}),
            invalid,
            "Sent extra: {mask}",
        ),
        "missing input": (
            predict_request("rel", "gradcam", {"images": good}),
            invalid,
            "Missing but required: {class_index}",
        ),
        "unknown output_filter": (
            predict_request(
                "rel", "gradcam", {"images": good, "class_index": classes}, output_filter=["heatmap", "saliency"]
            ),
            invalid,
            "saliency",
        ),
        "unknown signature": (
            predict_request("rel", "shap", {"images": good}),
            grpc.StatusCode.FAILED_PRECONDITION,
            "shap",
        ),
        "unknown model": (predict_request("nobody", "nobody", {"images": good}), grpc.StatusCode.NOT_FOUND, "nobody"),
        "tensor_content too short": (
            predict_request(
                "rel",
                "gradcam",
                {"images": _proto(types_pb2.DT_UINT8, [2, SIZE, SIZE, 3], b"x"), "class_index": classes},
            ),
            invalid,
            "tensor_content",
        ),
        # 20 bytes on the wire that would expand to 600 MB of zeros (TF's fill-from-fewer-values form);
        # with the default 2 GB message limit, see test_a_tensor_filled_from_few_values_is_capped
        "shape without values": (
            predict_request(
                "rel",
                "gradcam",
                {"images": _proto(types_pb2.DT_UINT8, [200_000, SIZE, SIZE, 3]), "class_index": classes},
            ),
            exhausted,
            f"more than the {MAX_MESSAGE}",
        ),
        "message over the limit": (
            bytes_request("rel", [os.urandom(MAX_MESSAGE + 1000)]),
            exhausted,
            "larger than max",
        ),
    }


HOSTILE_REQUESTS = ["wrong dtype", "NaN and inf floats", "class_index int64", "wrong rank", "wrong image size",
                    "batch sizes differ", "scalar input", "class_index = number of classes", "class_index < -1",
                    "empty batch", "batch over the maximum", "unknown input name", "missing input",
                    "unknown output_filter", "unknown signature", "unknown model", "tensor_content too short",
                    "shape without values", "message over the limit"]


@pytest.mark.parametrize("case", HOSTILE_REQUESTS)
def test_hostile_request_gets_a_clear_error_and_the_next_request_works(served, stub, tiny_gradcam_reference, case):
    req, code, fragment = _hostile_requests()[case]
    before = served.rss()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(req, timeout=20)
    assert time.monotonic() - started < 5
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details(), info.value.details()
    assert len(info.value.details()) < 400 and "[[{{" not in info.value.details()
    assert served.rss() - before < 100 * 2**20
    assert_serves(stub, tiny_gradcam_reference)


def test_a_tensor_filled_from_few_values_is_capped():
    """TF's shorthand (fewer values than the shape: the last one repeats) works for small tensors,
    and cannot turn a few bytes into gigabytes."""
    from camserve.serving.errors import ServingError
    from camserve.serving.tensors import MAX_FILL_BYTES, decode_tensor

    small = _proto(types_pb2.DT_INT32, [5])
    small.int_val.append(-1)
    np.testing.assert_array_equal(decode_tensor("class_index", small, 2**31 - 1), [-1] * 5)
    huge = _proto(types_pb2.DT_UINT8, [MAX_FILL_BYTES // (SIZE * SIZE * 3) + 1, SIZE, SIZE, 3])
    with pytest.raises(ServingError) as info:
        decode_tensor("images", huge, 2**31 - 1)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "carries 0" in info.value.message


def test_bytes_that_are_not_a_protobuf_are_invalid_argument(served, tiny_gradcam_reference, stub):
    with grpc.insecure_channel(served.address) as channel:
        raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")  # bytes in, bytes out
        for junk in (b"\xff\xff\xff\xff", b"\x0a\x05\x0a\x03rel\x12", os.urandom(64)):
            try:
                raw(junk, timeout=10)
            except grpc.RpcError as error:
                if junk == b"\xff\xff\xff\xff":
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "not a valid protobuf" in error.details()
                assert error.code() in DOCUMENTED, (junk, error.code(), error.details())
    assert_serves(stub, tiny_gradcam_reference)


# --- fuzzing ----------------------------------------------------------------------------------


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        kind = rng.integers(0, 4)
        if kind == 0 and data:  # flip bits
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and data:  # random byte, biased towards the header
            data[int(min(rng.exponential(40), len(data) - 1))] = int(rng.integers(0, 256))
        elif kind == 2:  # truncate
            data = data[: int(rng.integers(0, len(data) + 1))]
        else:  # insert junk
            at = int(rng.integers(0, len(data) + 1))
            data[at:at] = rng.bytes(int(rng.integers(1, 64)))
    return bytes(data)


DTYPES = [types_pb2.DT_UINT8, types_pb2.DT_INT32, types_pb2.DT_INT64, types_pb2.DT_FLOAT, types_pb2.DT_STRING,
          types_pb2.DT_BOOL, types_pb2.DT_HALF, types_pb2.DT_VARIANT, types_pb2.DT_RESOURCE, 77]


def _random_tensor(rng: np.random.Generator) -> tensor_pb2.TensorProto:
    dtype = DTYPES[int(rng.integers(0, len(DTYPES)))]
    rank = int(rng.integers(0, 6))
    shape = [int(rng.choice([0, 1, 2, 3, SIZE, MAX_BATCH + 1, 10**6, 2**31, -1])) for _ in range(rank)]
    proto = _proto(dtype, shape)
    fill = rng.integers(0, 4)
    if fill == 1:
        proto.tensor_content = rng.bytes(int(rng.integers(0, 5000)))
    elif fill == 2:
        proto.int_val.extend(rng.integers(-5, 300, size=int(rng.integers(0, 50))).tolist())
    elif fill == 3:
        proto.string_val.extend([rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(0, 4)))])
    if rng.random() < 0.2:
        proto.tensor_shape.unknown_rank = True
    return proto


def _fuzz_case(rng: np.random.Generator, seeds: dict) -> tuple[str, bytes]:
    """(what, serialized PredictRequest): mutated images, random tensors, or mutated message bytes."""
    kind = rng.integers(0, 4)
    classes = np.full(int(rng.integers(1, 3)), int(rng.integers(-3, NUM_CLASSES + 2)), np.int32)
    if kind == 0:
        fmt = list(seeds)[int(rng.integers(0, len(seeds)))]
        blobs = [_mutate(seeds[fmt], rng) for _ in classes]
        return f"mutated {fmt}", bytes_request("rel", blobs, classes).SerializeToString()
    if kind == 1:
        names = ["images", "class_index", "image_bytes", "mask", ""]
        signature = ["gradcam", "gradcam_bytes", "predict", "predict_bytes", "", "serving_default", "x"][
            int(rng.integers(0, 7))
        ]
        req = predict_request("rel", signature, {})
        for name in rng.choice(names, size=int(rng.integers(0, 3)), replace=False):
            req.inputs[str(name)].CopyFrom(_random_tensor(rng))
        if rng.random() < 0.3:
            req.output_filter.extend(
                rng.choice(["heatmap", "score", "nope", ""], size=int(rng.integers(1, 3))).tolist()
            )
        if rng.random() < 0.2:
            req.model_spec.version.value = int(rng.integers(-2, 3))
        return f"random tensors for {signature!r}", req.SerializeToString()
    valid = (
        explain_request("rel", random_images(1, SIZE, int(rng.integers(0, 1000))), classes[:1])
        if kind == 2
        else bytes_request("rel", [seeds["png"]], classes[:1])
    )
    return "mutated message", _mutate(valid.SerializeToString(), rng)


def test_fuzzed_requests_get_documented_codes_only(served, stub, tiny_gradcam_reference):
    rng = np.random.default_rng(20240601)
    image = random_images(1, SIZE, 7)[0]
    seeds = {
        "png": encode(".png", image),
        "jpeg": encode(".jpg", image),
        "bmp": encode(".bmp", image),
        "png16": encode(".png", image.astype(np.uint16) * 257),
    }
    codes: dict = {}
    started = time.monotonic()
    with grpc.insecure_channel(served.address) as channel:
        raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        for i in range(300):
            what, data = _fuzz_case(rng, seeds)
            try:
                raw(data, timeout=15)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert code in DOCUMENTED, f"case {i} ({what}): {code.name}: {error.details()}"
                assert error.details() and len(error.details()) < 600, (what, error.details())
            codes[code.name] = codes.get(code.name, 0) + 1
    elapsed = time.monotonic() - started
    print(f"fuzz: 300 requests in {elapsed:.1f} s: {codes}")
    assert elapsed < 60
    assert served.proc.poll() is None
    assert codes.get("INVALID_ARGUMENT", 0) > 100  # the fuzzer does reach the checks
    assert_serves(stub, tiny_gradcam_reference)


# --- deadlines, concurrency limit (in-process servers) ----------------------------------------


def _in_process(tiny_gradcam_model, **options) -> EmbeddedServer:
    config = configs.single_model_config("rel", str(tiny_gradcam_model))
    server = EmbeddedServer(
        config,
        ServerOptions(host="127.0.0.1", port=0, enable_model_warmup=False, file_system_poll_wait_seconds=0, **options),
    )
    server.start()
    return server


def _gate(server: EmbeddedServer, signature: str = "gradcam", hold: int = 0):
    """Make calls of `signature` with `hold` images (0: any) wait for the returned Event before
    running the model; returns (event, batch sizes run)."""
    sig = server.registry.resolve(model_spec("rel")).signature(signature)
    original, gate, runs = sig.run, threading.Event(), []

    def run(inputs, outputs=None):
        size = len(next(iter(inputs.values())))
        runs.append(size)
        if not hold or size == hold:
            gate.wait(20)
        return original(inputs, outputs)

    sig.run = run
    return gate, runs


def test_a_call_past_its_deadline_is_not_run_by_the_server(tiny_gradcam_model):
    """A call whose deadline passes while the server reads it (decoding held here) never reaches
    the model. (One still queued for a worker thread is dropped by grpc itself.)"""
    server = _in_process(tiny_gradcam_model)
    try:
        sig = server.registry.resolve(model_spec("rel")).signature("gradcam")
        decode, gate, runs = sig.decode_inputs, threading.Event(), []
        sig.decode_inputs = lambda protos, max_bytes: (gate.wait(20), decode(protos, max_bytes))[1]
        original_run = sig.run
        sig.run = lambda inputs, outputs=None: (runs.append(len(inputs["images"])), original_run(inputs, outputs))[1]
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as late:
            stub.Predict(
                explain_request("rel", random_images(2, SIZE, 0)), timeout=2.0
            )  # ample to reach the handler on a busy machine
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server's deadline runs from when it received the call, a little after the client's:
        # let it pass there too before the held call goes on.
        time.sleep(0.2)
        gate.set()
        assert wait_for(lambda: server.predictions.abandoned == 1)
        time.sleep(0.1)
        assert runs == []  # the late call never reached the model
        assert stub.Predict(explain_request("rel", random_images(3, SIZE, 0)), timeout=20)
        assert runs == [3]
    finally:
        server.stop(grace=1)


def test_a_call_that_times_out_in_the_batch_queue_is_dropped(tiny_gradcam_model):
    batching = configs.BatchingOptions(
        max_batch_size=MAX_BATCH, batch_timeout_micros=2_500_000, num_batch_threads=1, allowed_batch_sizes=(MAX_BATCH,)
    )
    server = _in_process(tiny_gradcam_model, batching=batching)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        stub.Predict(explain_request("rel", random_images(1, SIZE, 0)), timeout=20)  # connected, traced
        ran = sum(server.batcher.batch_sizes.values())
        with pytest.raises(grpc.RpcError) as late:
            stub.Predict(
                explain_request("rel", random_images(1, SIZE, 5)), timeout=1.0
            )  # reaches the queue, expires before the batch
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: server.batcher.abandoned == 1)
        assert sum(server.batcher.batch_sizes.values()) == ran  # no batch ran for it
        assert stub.Predict(explain_request("rel", random_images(1, SIZE, 0)), timeout=20)
    finally:
        server.stop(grace=1)


def test_max_concurrent_requests_refuses_the_excess_with_resource_exhausted(tiny_gradcam_model, tiny_gradcam_reference):
    server = from_flags("--port=0", "--model_name=rel", f"--model_base_path={tiny_gradcam_model}",
                        "--max_concurrent_requests=2",
                        "--enable_model_warmup=false", "--file_system_poll_wait_seconds=0")
    assert server.options.max_concurrent_requests == 2 and ServerOptions().max_concurrent_requests == 0
    server.start()
    try:
        gate, runs = _gate(server)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        busy = [stub.Predict.future(explain_request("rel", random_images(1, SIZE, i)), timeout=20) for i in range(2)]
        assert wait_for(lambda: len(runs) == 2)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(explain_request("rel", random_images(1, SIZE, 0)), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in refused.value.details()
        gate.set()
        assert all(f.result() for f in busy)
        assert_serves(stub, tiny_gradcam_reference)
    finally:
        server.stop(grace=1)


# --- versions -----------------------------------------------------------------------------------


def _install(base: pathlib.Path, source: pathlib.Path, version: int) -> None:
    staging = base / f".{version}-staging"  # the exporter's way: complete first, then rename
    shutil.copytree(source, staging)
    os.rename(staging, base / str(version))


def _versions(stub) -> list[int]:
    request_ = get_model_status_pb2.GetModelStatusRequest()
    request_.model_spec.name = "rel"
    return sorted(
        s.version
        for s in stub.GetModelStatus(request_, timeout=10).model_version_status
        if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    )


def test_versions_switch_under_load_and_broken_versions_are_refused(tiny_gradcam_model, tiny_gradcam_reference,
                                                                    tmp_path, caplog):
    base = tmp_path / "rel"
    base.mkdir()
    good = tiny_gradcam_model / "1"
    _install(base, good, 1)
    config = configs.single_model_config("rel", str(base))
    server = EmbeddedServer(
        config, ServerOptions(host="127.0.0.1", port=0, enable_model_warmup=False, file_system_poll_wait_seconds=0.2)
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    status = model_service_pb2_grpc.ModelServiceStub(channel)
    images = random_images(2, SIZE, 8)
    expected = tiny_gradcam_reference("gradcam", images=images, class_index=np.array([-1, -1], np.int32))["heatmap"]
    seen, failures, stop = [], [], threading.Event()

    def caller(i: int):
        while not stop.is_set():
            try:
                response = stub.Predict(explain_request("rel", images), timeout=20)
                np.testing.assert_allclose(arrays(response)["heatmap"], expected, rtol=1e-5, atol=1e-6)
                seen.append((i, response.model_spec.version.value))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(repr(e))

    try:
        caplog.set_level(logging.INFO, logger="serving.registry")
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: len(seen) > 10)
        _install(base, good, 2)  # a new version while requests are in flight
        assert wait_for(lambda: _versions(status) == [2])
        count = len(seen)
        assert wait_for(lambda: len(seen) > count + 10)
        # A corrupt version 3: refused with a log line, version 2 keeps serving.
        shutil.copytree(good, base / ".3")
        (base / ".3" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        os.rename(base / ".3", base / "3")
        assert wait_for(lambda: "failed to load model rel version 3" in caplog.text)
        assert "still serving version 2" in caplog.text
        assert wait_for(lambda: "attempt 5 of 5" in caplog.text)
        count = len(seen)
        assert wait_for(lambda: len(seen) > count + 10)
        assert _versions(status) == [2]
        # Fixed on disk: loaded without a restart although its attempts were used up.
        shutil.copy(good / "saved_model.pb", base / "3" / "saved_model.pb")
        assert wait_for(lambda: _versions(status) == [3])
        # A half-written version 4 (no saved_model.pb yet): not loaded until it is complete.
        shutil.copytree(good, base / "4", ignore=shutil.ignore_patterns("saved_model.pb"))
        assert wait_for(lambda: "version 4" in caplog.text and "has no saved_model.pb" in caplog.text)
        time.sleep(0.5)
        assert _versions(status) == [3]
        shutil.copy(good / "saved_model.pb", base / "4" / "saved_model.pb")
        assert wait_for(lambda: _versions(status) == [4])
        # Every caller answered by version 4 (a few answers in all could come from one caller alone).
        assert wait_for(lambda: {i for i, v in list(seen) if v == 4} == set(range(4)), timeout=30)
        # model_spec.version pins: the served version answers, an unloaded one is NOT_FOUND
        pinned = explain_request("rel", images)
        pinned.model_spec.version.value = 4
        assert stub.Predict(pinned, timeout=20).model_spec.version.value == 4
        pinned.model_spec.version.value = 2
        with pytest.raises(grpc.RpcError) as gone:
            stub.Predict(pinned, timeout=20)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop(grace=1)
        channel.close()
    assert failures == []
    assert {v for _, v in seen} == {1, 2, 3, 4}
    for i in range(4):  # each caller's answers: never back to an older version
        mine = [v for caller_, v in seen if caller_ == i]
        assert mine == sorted(mine) and mine[-1] == 4


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> pathlib.Path:
    """`make certs`' CA, server and client certificates and ssl.config, and an unrelated CA with its own client."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    from camserve.serving.certs import make_ca, make_certificate, make_test_pki

    d = tmp_path_factory.mktemp("pki")
    make_test_pki(d)
    make_ca(d, "other_ca")
    make_certificate(d, "stranger", ca="other_ca")
    return d


def test_mutual_tls_refuses_plaintext_wrong_ca_and_clients_without_a_certificate(tiny_gradcam_model, pki, tmp_path,
                                                                                 capsys):
    from camserve.client import CamClient, CamServingError, RetryPolicy, tls_credentials
    from camserve.client.__main__ import main as client_main

    ssl = configs.read_text_proto(pki / "ssl.config", configs.SSLConfig)  # as `make certs` writes it
    assert ssl.client_verify and ssl.custom_ca == (pki / "ca.pem").read_text()
    flags = ["--port=0", "--model_name=rel", f"--model_base_path={tiny_gradcam_model}", "--enable_model_warmup=false",
             "--file_system_poll_wait_seconds=0"]
    server = from_flags(*flags, f"--ssl_config_file={pki / 'ssl.config'}")
    port = server.start()
    address = f"localhost:{port}"
    image = tmp_path / "image.png"
    image.write_bytes(encode(".png", random_images(1, SIZE, 9)[0]))
    try:
        as_paths = tls_credentials(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        as_bytes = tls_credentials(*((pki / name).read_bytes() for name in ("ca.pem", "client.pem", "client.key")))
        for good in (as_paths, as_bytes):
            with CamClient(address, model="rel", credentials=good, timeout=10) as client:
                assert client.predict(image.read_bytes()).class_label.startswith("class_")
        assert (
            client_main(
                ["predict", str(image), "--server", address, "--model", "rel", "--ca-cert", str(pki / "ca.pem"),
                 "--client-cert", str(pki / "client.pem"), "--client-key", str(pki / "client.key")]
            )
            == 0
        )
        assert "class_" in capsys.readouterr().out
        refused = {
            "plaintext": None,
            "no client certificate": tls_credentials(pki / "ca.pem"),
            "wrong CA for the server": tls_credentials(pki / "other_ca.pem", pki / "client.pem", pki / "client.key"),
            "client certificate from another CA": tls_credentials(
                pki / "ca.pem", pki / "stranger.pem", pki / "stranger.key"
            ),
        }
        for what, credentials in refused.items():
            with CamClient(
                address,
                model="rel",
                credentials=credentials,
                timeout=5,
                retry=RetryPolicy(max_attempts=1),
                channel_options=[("grpc.enable_retries", 0)],
            ) as client:
                with pytest.raises(CamServingError) as info:
                    client.predict(image.read_bytes())
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, what
        with pytest.raises(ValueError, match="both"):
            tls_credentials(pki / "ca.pem", pki / "client.pem")
    finally:
        server.stop(grace=1)
    no_ca = configs.SSLConfig(server_key=ssl.server_key, server_cert=ssl.server_cert, client_verify=True)
    (tmp_path / "no_ca.config").write_text(text_format.MessageToString(no_ca))
    with pytest.raises(ValueError, match="client_verify needs custom_ca"):
        from_flags(*flags, f"--ssl_config_file={tmp_path / 'no_ca.config'}").start()


def test_binds_loopback_by_default(served):
    p = parser()
    _, options = options_from_args(p.parse_args(["--model_base_path=/x"]), p)
    assert options.host == ServerOptions().host == "127.0.0.1"
    port = int(served.address.rsplit(":", 1)[1])
    listening = [
        c.laddr
        for c in psutil.Process(served.proc.pid).net_connections("all")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening
    for address in listening:  # 127.0.0.1, or the same as an IPv4-mapped IPv6 address
        ip = ipaddress.ip_address(address.ip)
        assert (ip.ipv4_mapped or ip) == ipaddress.ip_address("127.0.0.1"), listening


# --- client retries (a fake server that is unavailable twice) ------------------------------------


def test_client_retries_unavailable_with_backoff_and_a_cap():
    from tensorflow_serving.apis import get_model_metadata_pb2

    from camserve.client import CamClient, CamServingError, RetryPolicy

    calls = []

    class Flaky(prediction_service_pb2_grpc.PredictionServiceServicer):
        def GetModelMetadata(self, request_, context):
            calls.append(time.monotonic())
            if len(calls) % 3:  # two failures, then an answer
                context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
            signatures = get_model_metadata_pb2.SignatureDefMap()
            for d in (-1, 24, 40, 3):
                signatures.signature_def["predict"].inputs["images"].tensor_shape.dim.add(size=d)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.metadata["signature_def"].Pack(signatures)
            return response

        def Predict(self, request_, context):
            calls.append(time.monotonic())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not retried")

    fake, port = fake_server(Flaky())
    no_channel_retries = [("grpc.enable_retries", 0)]  # count this client's own attempts
    try:
        policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.15)
        with CamClient(f"127.0.0.1:{port}", model="m", retry=policy, channel_options=no_channel_retries) as client:
            assert client.model_image_size() == (24, 40)
            assert len(calls) == 3
            waits = np.diff(calls)
            assert 0.05 <= waits[0] and 0.075 <= waits[1]  # jittered backoff: 0.1, then min(0.2, cap 0.15)
            calls.clear()
            with pytest.raises(CamServingError) as info:
                client.predict(np.zeros((24, 40, 3), np.uint8))
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(calls) == 1  # not retried
        calls.clear()
        with CamClient(
            f"127.0.0.1:{port}",
            model="m",
            retry=RetryPolicy(max_attempts=2, initial_backoff=0.01),
            channel_options=no_channel_retries,
        ) as client:
            with pytest.raises(CamServingError) as info:
                client.model_image_size()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and len(calls) == 2  # capped
            assert "after 2 attempts" in str(info.value)
    finally:
        fake.stop(None)


def test_default_client_retries_once_per_layer_and_throttles_a_failing_server():
    """By default only the channel retries (gRPC's policy, up to 5 attempts), and its throttling
    stops retrying once most calls fail: 10 calls to a server that always answers UNAVAILABLE cost
    5 + 9 attempts, not 10 x 5 (or 10 x 5 x 3 with a second retry layer)."""
    from camserve.client import CamClient, CamServingError

    calls = []

    class Down(prediction_service_pb2_grpc.PredictionServiceServicer):
        def GetModelMetadata(self, request_, context):
            calls.append(time.monotonic())
            context.abort(grpc.StatusCode.UNAVAILABLE, "queue full")

    fake, port = fake_server(Down())
    try:
        with CamClient(f"127.0.0.1:{port}", model="m", timeout=10) as client:
            attempts = []
            for _ in range(10):
                calls.clear()
                with pytest.raises(CamServingError) as info:
                    client.model_image_size()
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
                attempts.append(len(calls))
        assert attempts[0] == 5  # the channel's retry policy
        assert sum(attempts) <= 20 and attempts[-1] == 1, attempts  # throttled
    finally:
        fake.stop(None)


# --- SIGTERM under load (last: it stops the subprocess server) -----------------------------------


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_0(served, tiny_gradcam_reference):
    """Callers keep sending; SIGTERM comes while calls sit in the 50 ms batch window. Those sent
    before it all succeed, later ones are refused (UNAVAILABLE; or CANCELLED from gRPC for a call
    that reaches the listener in the instant it closes, before any handler saw it), exit status 0."""
    address = served.address
    images = random_images(MAX_BATCH, SIZE, 12)
    expected = tiny_gradcam_reference("gradcam", images=images, class_index=np.full(MAX_BATCH, -1, np.int32))["heatmap"]
    results, pending, stop = [], {}, threading.Event()
    lock = threading.Lock()

    def caller(i: int):
        with grpc.insecure_channel(address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                sent = pending[i] = time.monotonic()
                try:
                    response = stub.Predict(explain_request("rel", images[i : i + 1]), timeout=30)
                    np.testing.assert_allclose(arrays(response)["heatmap"][0], expected[i], rtol=1e-5, atol=1e-6)
                    outcome = "OK"
                except grpc.RpcError as error:
                    outcome = f"{error.code().name}: {error.details()}"
                    time.sleep(0.05)
                finally:
                    pending.pop(i, None)
                with lock:
                    results.append((sent, time.monotonic(), outcome))

    # Fewer callers than a full batch: each call waits out the 50 ms batch window.
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(MAX_BATCH - 2)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: len(results) > 30)
    assert wait_for(lambda: any(time.monotonic() - t > 0.015 for t in list(pending.values())), 5)
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    code = served.proc.wait(timeout=30)
    exited = time.monotonic()
    with grpc.insecure_channel(address) as channel:  # after the exit: nobody listens
        with pytest.raises(grpc.RpcError) as late:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                explain_request("rel", images[:1]), timeout=5
            )
    stop.set()
    for thread in threads:
        thread.join()
    assert code == 0
    assert "SIGTERM received" in served.log
    assert late.value.code() == grpc.StatusCode.UNAVAILABLE
    # Sent before the signal and delivered: on a busy machine a caller's thread can note its time and
    # reach the socket only after the listener closed ("failed to connect": the server never saw it).
    before = [r for r in results if r[0] < signalled - 0.01 and "failed to connect" not in r[2]]
    in_flight = [r for r in before if r[1] > signalled]  # sent before the signal, answered after it
    assert in_flight and all(outcome == "OK" for _, _, outcome in before), [r for r in before if r[2] != "OK"]
    after = [outcome for sent, _, outcome in results if sent >= signalled - 0.01]
    assert any(outcome.startswith("UNAVAILABLE") for outcome in after)  # refused while shutting down
    assert all(outcome == "OK" or outcome.startswith(("UNAVAILABLE", "CANCELLED")) for outcome in after), after
    assert all(outcome.startswith("UNAVAILABLE") for sent, _, outcome in results if sent > exited)
