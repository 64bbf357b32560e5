"""Closed-loop gRPC load against a PredictionService (embedded server or real TF Serving).

Requests are serialised once with the thin client's wire messages and sent as raw bytes, so the
load generator costs almost nothing and request/response sizes are measured exactly.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from camserve.client import protos
from camserve.client.api import MAX_MESSAGE_BYTES

SUMMARY = ["class_index", "class_label", "score", "top_k_indices", "top_k_scores", "top_k_labels"]


def serialised_request(model: str, signature: str, batch: int, jpeg: bytes | None, image: np.ndarray | None,
                       outputs: list[str], method: str | None = None) -> bytes:
    """A serialised PredictRequest of `batch` copies: `jpeg` to a _bytes signature, else `image`; `method`
    in each row (explain, explain_bytes)."""
    return protos.predict_request(
        protos.ModelSpec(name=model, signature_name=signature),
        images=None if jpeg is not None else np.stack([image] * batch),
        image_bytes=None if jpeg is None else [jpeg] * batch,
        class_index=None if signature.startswith("predict") else np.full(batch, -1, np.int32),
        method=[method] * batch if method else None,
        output_filter=outputs,
    ).SerializeToString()


def raw_predict(target: str) -> tuple[grpc.Channel, grpc.UnaryUnaryMultiCallable]:
    """A channel and its Predict method taking and returning serialised messages."""
    channel = grpc.insecure_channel(
        target,
        [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    return channel, channel.unary_unary(protos.PREDICT_METHOD)


def closed_loop(target: str, payload: bytes, concurrency: int, duration: float, timeout: float = 60.0) -> dict:
    """`concurrency` callers each send the next request when the last one returns, for `duration` s.

    Calls still in flight when the time is up are cancelled, not awaited (a batch-8 call at
    concurrency 16 can take 10 s), so throughput is the completed requests over the time from the
    start to the last completion.
    """
    channel, call = raw_predict(target)
    call(payload, timeout=timeout)  # warm the connection and the server's path
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sizes: list[int] = []
    lock = threading.Lock()
    started, cpu_started = time.perf_counter(), time.process_time()
    stop_at = started + duration
    last = [started]

    def caller():
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            future = call.future(payload, timeout=timeout)
            try:
                response = future.result(timeout=max(0.0, stop_at - sent))
            except grpc.FutureTimeoutError:
                future.cancel()
                return
            except grpc.RpcError as error:
                with lock:
                    errors[error.code().name] = errors.get(error.code().name, 0) + 1
                continue
            done = time.perf_counter()
            with lock:
                latencies.append(done - sent)
                sizes.append(len(response))
                last[0] = max(last[0], done)

    threads = [threading.Thread(target=caller) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu_started
    channel.close()
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": last[0] - started,
        "latencies_s": latencies,
        "request_bytes": len(payload),
        "response_bytes": int(np.median(sizes)) if sizes else 0,
        # CPU seconds this process spent per wall second: on a machine shared with the server,
        # what the load generator takes away from it.
        "cpu_share": cpu / (time.perf_counter() - started),
    }
