"""Server-side dynamic batching: concurrent requests for the same signature become one model call.

A GPU computes 8 images in little more time than 1, so grouping requests raises throughput. This
follows TF Serving's batch scheduler: one queue per (model, version, signature, outputs); a batch
is run when it is full or when its first request has waited `batch_timeout_micros`, by one of
`num_batch_threads` workers; a queue holds at most `max_enqueued_batches` batches, beyond which
requests are refused with UNAVAILABLE; a batch is padded (with copies of the first row of its last
request) up to the smallest `allowed_batch_sizes` entry that holds it, so the model only ever sees
the warmed-up sizes; outputs are split back per request.

As in TF Serving, a batch gets one status: when the merged run fails, every request in it gets the
error. (The exported graph keeps that rare: a faulty image or class index only marks its own row.)
`rerun_failed=True`, which TF Serving does not have, reruns a failed batch one request at a time
so that only the faulty request fails.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Hashable, Mapping

import grpc
import numpy as np

from .configs import BatchingOptions
from .errors import ServingError

log = logging.getLogger("serving.batching")

Arrays = Mapping[str, np.ndarray]
RunFunction = Callable[[Arrays], dict[str, np.ndarray]]


class _Task:
    def __init__(self, inputs: Arrays, size: int, is_active: Callable[[], bool] | None = None):
        self.inputs = inputs
        self.size = size
        self.is_active = is_active  # False once the caller is gone (deadline passed, cancelled)
        self.queued = time.monotonic()
        self.done = threading.Event()
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None

    def finish(self, result: dict[str, np.ndarray] | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def wait(self) -> dict[str, np.ndarray]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class _Batch:
    def __init__(self, run: RunFunction):
        self.run = run
        self.tasks: list[_Task] = []
        self.size = 0
        self.created = time.monotonic()
        self.closed = False


class Batcher:
    """Groups tasks submitted with the same key into batches run by worker threads."""

    def __init__(self, options: BatchingOptions, rerun_failed: bool = False,
                 on_batch: Callable[[int, int, list[float]], None] | None = None):
        self.options = options
        self.rerun_failed = rerun_failed
        self.on_batch = on_batch  # (rows, padded rows, seconds each request queued): metrics
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # executed (padded) sizes
        self.abandoned = 0  # tasks dropped from their batch because their caller was gone
        self._cond = threading.Condition()
        self._queues: dict[Hashable, collections.deque[_Batch]] = {}
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, key: Hashable, run: RunFunction, inputs: Arrays, size: int, is_active: Callable[[], bool] | None = None
    ) -> dict[str, np.ndarray]:
        """Run `run` on `inputs` (`size` rows on dimension 0) as part of a batch; blocks until done.

        `is_active` (the RPC's `context.is_active`) is asked again when the batch is formed: a
        task whose caller is gone by then is dropped, not computed.
        """
        if size > self.options.max_batch_size:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Task size {size} is larger than maximum input batch size {self.options.max_batch_size}",
            )
        limit = self.options.execution_batch_size
        if size <= limit:
            return self._enqueue(key, run, inputs, size, is_active).wait()
        # enable_large_batch_splitting: pieces of at most max_execution_batch_size rows.
        tasks = [
            self._enqueue(
                key, run, {k: v[start : start + limit] for k, v in inputs.items()}, min(limit, size - start), is_active
            )
            for start in range(0, size, limit)
        ]
        results = [task.wait() for task in tasks]
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

    def _enqueue(
        self, key: Hashable, run: RunFunction, inputs: Arrays, size: int, is_active: Callable[[], bool] | None = None
    ) -> _Task:
        task = _Task(inputs, size, is_active)
        limit = self.options.execution_batch_size
        with self._cond:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            queue = self._queues.setdefault(key, collections.deque())
            batch = queue[-1] if queue and not queue[-1].closed and queue[-1].size + size <= limit else None
            if batch is None:
                if len(queue) >= self.options.max_enqueued_batches:
                    raise ServingError(
                        grpc.StatusCode.UNAVAILABLE,
                        "The batch scheduling queue to which this task was submitted is full "
                        f"({self.options.max_enqueued_batches} batches waiting)",
                    )
                if queue:
                    queue[-1].closed = True
                batch = _Batch(run)
                queue.append(batch)
            batch.tasks.append(task)
            batch.size += size
            if batch.size >= limit:
                batch.closed = True
            self._cond.notify_all()
        return task

    def _next_ready(self) -> tuple[_Batch | None, float | None]:
        """The oldest batch that is full or timed out, else how long until one times out."""
        now = time.monotonic()
        timeout = self.options.batch_timeout_micros / 1e6
        best_key, wait = None, None
        for key, queue in self._queues.items():
            head = queue[0]
            if head.closed or self._stopping or now - head.created >= timeout:
                if best_key is None or head.created < self._queues[best_key][0].created:
                    best_key = key
            else:
                remaining = head.created + timeout - now
                wait = remaining if wait is None else min(wait, remaining)
        if best_key is None:
            return None, wait
        queue = self._queues[best_key]
        batch = queue.popleft()
        batch.closed = True
        if not queue:
            del self._queues[best_key]
        return batch, None

    def _work(self) -> None:
        while True:
            with self._cond:
                batch, wait = self._next_ready()
                while batch is None:
                    if self._stopping and not self._queues:
                        return
                    self._cond.wait(wait)
                    batch, wait = self._next_ready()
            self._execute(batch.run, batch.tasks)

    @staticmethod
    def _merged(name: str, parts: list[np.ndarray], padding: int) -> np.ndarray:
        """The requests' tensors concatenated on dimension 0, padded with copies of the first row of
        the last one (as TF Serving pads)."""
        if len({p.shape[1:] for p in parts}) > 1:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Tensors with name '{name}' from different tasks have different shapes and padding is turned off. "
                "Set pad_variable_length_inputs to true, or ensure that all tensors with the same name have equal "
                "dimensions starting with the first dim.",
            )
        if padding:
            parts = [*parts, np.repeat(parts[-1][:1], padding, axis=0)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _padded_size(self, size: int) -> int:
        return next((b for b in self.options.allowed_batch_sizes if b >= size), size)

    def _execute(self, run: RunFunction, tasks: list[_Task]) -> None:
        live = [t for t in tasks if t.is_active is None or t.is_active()]
        if len(live) < len(tasks):
            with self._cond:
                self.abandoned += len(tasks) - len(live)
            log.info(
                "%d of %d requests of a batch were not run: their callers had gone (deadline exceeded or cancelled, "
                "e.g. a load generator stopping); no error was answered, nobody was waiting",
                len(tasks) - len(live),
                len(tasks),
            )
            for task in tasks:
                if task not in live:
                    task.finish(
                        error=ServingError(
                            grpc.StatusCode.CANCELLED,
                            "the call was cancelled or its deadline passed in the batch queue",
                        )
                    )
            if not live:
                return
            tasks = live
        try:
            total = sum(t.size for t in tasks)
            padded = self._padded_size(total)
            inputs = {
                name: self._merged(name, [t.inputs[name] for t in tasks], padded - total) for name in tasks[0].inputs
            }
            with self._cond:
                self.batch_sizes[padded] += 1
            if self.on_batch is not None:
                started = time.monotonic()
                self.on_batch(total, padded, [started - t.queued for t in tasks])
            outputs = run(inputs)
            for name, value in outputs.items():
                if np.ndim(value) == 0 or value.shape[0] != padded:
                    raise ServingError(
                        grpc.StatusCode.INTERNAL,
                        f"output '{name}' has shape {np.shape(value)}: not batched on dimension 0 "
                        f"(batch of {padded}), so it cannot be split between requests",
                    )
        except Exception as e:
            if self.rerun_failed and len(tasks) > 1:
                log.info("a batch of %d requests failed (%s); running them one by one", len(tasks), e)
                for task in tasks:
                    self._execute(run, [task])
            else:
                for task in tasks:
                    task.finish(error=e)
            return
        offset = 0
        for task in tasks:
            task.finish({k: v[offset : offset + task.size] for k, v in outputs.items()})
            offset += task.size

    def stop(self) -> None:
        """Run what is queued, then end the worker threads; later submissions get UNAVAILABLE."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
