"""Load: 32 concurrent callers for LOAD_SECONDS (default 60) of mixed valid and hostile requests.

Against a `python -m serving` subprocess on loopback, started the way the Makefile starts it
(MALLOC_ARENA_MAX=2, batching on). Every valid answer must equal the in-process heatmap, every
hostile one must get its INVALID_ARGUMENT (or, computed in a batch beside good rows, its row's
error), nothing else may happen, and the server's RSS must stay
flat after the warm-up. Marked `load`: `make test` skips it, `make test-load` runs it.
"""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from calls import arrays, bytes_request, explain_request
from images import encode, gif, png_bomb, random_images
from servers import ServerProcess
from synthetic import TINY_CLASSES as NUM_CLASSES
from synthetic import TINY_MAX_BATCH as MAX_BATCH
from synthetic import TINY_SIZE as SIZE

pytestmark = pytest.mark.load

LOAD_SECONDS = float(os.environ.get("LOAD_SECONDS", "60"))
CALLERS = 32
# As the Makefile's serve, demo and bench targets; LOAD_MALLOC_ARENA_MAX="" compares with glibc's default.
_ARENAS = os.environ.get("LOAD_MALLOC_ARENA_MAX", "2")
SERVER_ENV = {"MALLOC_ARENA_MAX": _ARENAS} if _ARENAS else {}


def test_load_mixed_requests_all_correct_and_memory_flat(tiny_gradcam_model, tiny_gradcam_reference, tmp_path):
    (tmp_path / "batching.config").write_text(
        f"max_batch_size {{ value: {MAX_BATCH} }}\nallowed_batch_sizes: 1\nallowed_batch_sizes: 4\n"
        f"allowed_batch_sizes: {MAX_BATCH}\nbatch_timeout_micros {{ value: 2000 }}\n"
        "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 1000 }\n")
    server = ServerProcess(
        ["--port", "0", "--model_name", "rel", "--model_base_path", str(tiny_gradcam_model), "--enable_batching",
         "--batching_parameters_file", str(tmp_path / "batching.config"), "--max_concurrent_requests",
         str(2 * CALLERS), "--file_system_poll_wait_seconds", "0"],
        env=SERVER_ENV,
    )
    try:
        address = server.wait_ready()
        pool = random_images(16, SIZE, 21)
        classes = np.arange(-1, NUM_CLASSES, dtype=np.int32)
        # expected[image, class + 1]: the in-process heatmap of every (image, class) pair
        expected = np.stack(
            [
                np.concatenate(
                    [
                        tiny_gradcam_reference(
                            "gradcam",
                            images=pool[i : i + MAX_BATCH],
                            class_index=np.full(len(pool[i : i + MAX_BATCH]), c, np.int32),
                        )["heatmap"]
                        for i in range(0, len(pool), MAX_BATCH)
                    ]
                )
                for c in classes
            ],
            axis=1,
        )
        pngs = [encode(".png", image) for image in pool]
        bomb = png_bomb(16000)
        hostile = [
            (
                lambda rng: explain_request("rel", pool[:2], [0, NUM_CLASSES]),
                f"class_index {NUM_CLASSES} is out of range",
            ),
            (lambda rng: bytes_request("rel", [b"garbage" * 10]), "not a JPEG, PNG or BMP image"),
            (lambda rng: explain_request("rel", pool[:1].astype(np.int32)), "expected dtype uint8"),
            (lambda rng: bytes_request("rel", [bomb]), "declares 16000x16000 pixels"),
            (lambda rng: bytes_request("rel", [gif(pool[0])]), "GIF images are not accepted"),
        ]
        counts = {"valid": 0, "refused as expected": 0}
        unexpected: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + LOAD_SECONDS

        def caller(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with grpc.insecure_channel(address) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                while time.monotonic() < deadline:
                    kind = rng.random()
                    try:
                        if kind < 0.8:
                            n = int(rng.integers(1, 4))
                            picked = rng.choice(len(pool), n, replace=False)
                            targets = rng.choice(classes, n)
                            req = (
                                explain_request("rel", pool[picked], targets)
                                if kind < 0.5
                                else bytes_request("rel", [pngs[i] for i in picked], targets)
                            )
                            got = arrays(stub.Predict(req, timeout=60))["heatmap"]
                            np.testing.assert_allclose(got, expected[picked, targets + 1], rtol=1e-5, atol=1e-6)
                            with lock:
                                counts["valid"] += 1
                        else:
                            make, fragment = hostile[int(rng.integers(0, len(hostile)))]
                            try:
                                # Computed beside good rows (in this request or in its batch), a
                                # faulty row is answered with its error; alone, the call fails.
                                outputs = stub.Predict(make(rng), timeout=60).outputs
                                errors = tf.make_ndarray(outputs["error"]) if "error" in outputs else []
                                if not any(fragment in error.decode() for error in errors):
                                    raise AssertionError(f"accepted a request that must fail with {fragment!r}")
                            except grpc.RpcError as error:
                                if error.code() != grpc.StatusCode.INVALID_ARGUMENT or fragment not in error.details():
                                    raise
                            with lock:
                                counts["refused as expected"] += 1
                    except Exception as error:  # noqa: BLE001 - every surprise is collected and reported
                        with lock:
                            unexpected.append(f"{type(error).__name__}: {str(error)[:300]}")

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        rss = []
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - started, server.rss()))
            time.sleep(1)
        for thread in threads:
            thread.join()
        rss.append((time.monotonic() - started, server.rss()))
        elapsed = time.monotonic() - started
        warm = [r for t, r in rss if t >= 0.2 * LOAD_SECONDS]  # after the first fifth: pools and caches are warm
        start, end, peak = warm[0], rss[-1][1], max(r for _, r in rss)
        total = counts["valid"] + counts["refused as expected"] + len(unexpected)
        print(
            f"\nload: {CALLERS} callers, {elapsed:.0f} s, {total} requests ({total / elapsed:.0f}/s): {counts}, "
            f"{len(unexpected)} unexpected; server RSS {rss[0][1] / 2**20:.0f} MiB at 0 s, "
            f"{start / 2**20:.0f} MiB warm, {end / 2**20:.0f} MiB at the end, peak {peak / 2**20:.0f} MiB "
            f"(env {SERVER_ENV}); RSS MiB over time: "
            + " ".join(f"{r / 2**20:.0f}" for _, r in rss[:: max(1, len(rss) // 12)])
        )
        assert unexpected == [], unexpected[:5]
        assert counts["valid"] > 0 and counts["refused as expected"] > 0
        assert end - start < max(64 * 2**20, 0.1 * start), f"RSS grew from {start / 2**20:.0f} to {end / 2**20:.0f} MiB"
        assert server.proc.poll() is None
    finally:
        server.stop()
