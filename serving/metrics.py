"""Prometheus metrics under TF Serving's names, served on the REST port (--monitoring_config_file).

TF Serving's names where it has the metric (util/prometheus_exporter.cc turns "/tensorflow/serving/x"
into ":tensorflow:serving:x"; counters carry no "_total" suffix), with its labels and buckets:

    :tensorflow:serving:request_count{model_name,status}            every call, gRPC and REST
    :tensorflow:serving:request_latency{model_name,API,entrypoint}   µs, successful calls
    :tensorflow:serving:batching_session:queuing_latency{thread_pool_name}   µs in the batch queue
    :tensorflow:serving:batching_session:input_batch_size            rows a batch holds
    :tensorflow:serving:batching_session:processed_batch_size        rows it runs with (padded)
    :tensorflow:serving:batching_session:padding_size{execution_batch_size}
    :tensorflow:cc:saved_model:load_attempt_count{model_path,status}  "success" / "fail"

TF Serving has no metric for a version's state nor for what was explained; ours:

    :camserve:model_version_state{model_name,version,state}  1 for each version's current state
    :camserve:heatmap_count{model_name,method}               images explained, per method
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

prometheus_client.disable_created_metrics()  # TF Serving has no *_created series

DEFAULT_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


def _exponential(scale: float, growth: float, count: int) -> list[float]:
    """TF Serving's monitoring::Buckets::Exponential(scale, growth, count) upper bounds."""
    return [scale * growth**i for i in range(count)]


class _VersionStates(Collector):
    """Reads the registry's states at scrape time: nothing to keep in step."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, int, str]]]):
        self.states = states

    def collect(self):
        family = GaugeMetricFamily(":camserve:model_version_state",
                                   "1 for the current state of each model version the server knows",
                                   labels=["model_name", "version", "state"])
        for model, version, state in self.states():
            family.add_metric([model, str(version), state], 1)
        yield family


class Metrics:
    """The server's metrics; `exposition()` is what the metrics path answers."""

    def __init__(self):
        self._version_states: Callable[[], Iterable[tuple[str, int, str]]] = lambda: ()
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.request_count = prometheus_client.Counter(
            ":tensorflow:serving:request_count", "The total number of requests.", ["model_name", "status"], registry=r)
        self.request_latency = prometheus_client.Histogram(
            ":tensorflow:serving:request_latency", "Distribution of wall time (in microseconds) for requests.",
            ["model_name", "API", "entrypoint"], buckets=_exponential(10, 1.8, 33), registry=r)
        self.queuing_latency = prometheus_client.Histogram(
            ":tensorflow:serving:batching_session:queuing_latency",
            "Distribution of wall time spent (in microseconds) in queuing", ["thread_pool_name"],
            buckets=_exponential(100, 1.2, 52), registry=r)
        self.input_batch_size = prometheus_client.Histogram(
            ":tensorflow:serving:batching_session:input_batch_size",
            "Tracks the batch size distribution on the inputs.",
            buckets=_exponential(1, 2, 14),
            registry=r,
        )
        self.processed_batch_size = prometheus_client.Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Tracks the batch size distribution on processing.",
            buckets=_exponential(1, 2, 14),
            registry=r,
        )
        self.padding_size = prometheus_client.Histogram(
            ":tensorflow:serving:batching_session:padding_size",
            "Tracks the padding size distribution on batches.",
            ["execution_batch_size"],
            buckets=_exponential(1, 2, 14),
            registry=r,
        )
        self.load_attempt_count = prometheus_client.Counter(
            ":tensorflow:cc:saved_model:load_attempt_count",
            "The number of times a SavedModel was successfully loaded.",
            ["model_path", "status"],
            registry=r,
        )
        self.heatmap_count = prometheus_client.Counter(
            ":camserve:heatmap_count",
            "Images explained, per model and method (signature).",
            ["model_name", "method"],
            registry=r,
        )
        r.register(_VersionStates(lambda: self._version_states()))
        self._counters = [
            self.request_count.describe()[0].name,
            self.load_attempt_count.describe()[0].name,
            self.heatmap_count.describe()[0].name,
        ]

    def watch_states(self, states: Callable[[], Iterable[tuple[str, int, str]]]) -> None:
        """Where :camserve:model_version_state reads (model, version, state) at each scrape."""
        self._version_states = states

    def load_attempt(self, model_path: str, succeeded: bool) -> None:
        self.load_attempt_count.labels(model_path, "success" if succeeded else "fail").inc()

    def request(self, model_name: str, status: str, api: str, entrypoint: str, seconds: float) -> None:
        """One call: counted always, its latency only when it succeeded (as TF Serving)."""
        self.request_count.labels(model_name, status).inc()
        if status == "OK":
            self.request_latency.labels(model_name, api, entrypoint).observe(seconds * 1e6)

    def batch(self, input_size: int, padded_size: int, queued_seconds: Iterable[float], pool: str) -> None:
        """One batch the batcher ran: its sizes and how long each of its requests waited."""
        self.input_batch_size.observe(input_size)
        self.processed_batch_size.observe(padded_size)
        self.padding_size.labels(str(padded_size)).observe(padded_size - input_size)
        for seconds in queued_seconds:
            self.queuing_latency.labels(pool).observe(seconds * 1e6)

    def exposition(self) -> bytes:
        """The Prometheus text format, counters under TF Serving's names (no "_total")."""
        text = prometheus_client.generate_latest(self.registry).decode()
        for name in self._counters:
            text = re.sub(rf"(?m)^((?:# (?:HELP|TYPE) )?{re.escape(name)})_total(?=[ {{])", r"\1", text)
        return text.encode()
