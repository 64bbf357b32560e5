"""An embedded server with its REST port and metrics on, and plain HTTP calls to it."""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import urllib.error
import urllib.request

from serving import configs
from serving.server import EmbeddedServer, ServerOptions

import synthetic

SIZE, NUM_CLASSES = 32, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_tiny(base: pathlib.Path, version: int = 1, methods=("gradcam", "cam")) -> pathlib.Path:
    """The tiny GAP CNN exported under `base`/<version>; returns the version directory."""
    from export.savedmodel import export_savedmodel

    keras_file = base.parent / f"{base.name}.keras"
    if not keras_file.exists():
        synthetic.tiny_gap_cnn(keras_file, SIZE, NUM_CLASSES, seed=3)
    return export_savedmodel(str(keras_file), "none", list(methods), base.name, str(base.parent), version=version,
                             warmup_batch_sizes=(1,), feature_maps=0, log=synthetic.quiet)


def start(models: dict[str, pathlib.Path], metrics: bool = True, **options) -> EmbeddedServer:
    """An in-process EmbeddedServer on free ports serving `models` (name -> base path)."""
    config = configs.ModelServerConfig()
    for name, base_path in models.items():
        config.model_config_list.config.add(name=name, base_path=str(base_path), model_platform="tensorflow")
    monitoring = None
    if metrics:
        monitoring = configs.MonitoringConfig()
        monitoring.prometheus_config.enable = True
        monitoring.prometheus_config.path = "/monitoring/prometheus/metrics"
    server = EmbeddedServer(config, ServerOptions(port=0, rest_api_port=free_port(), monitoring=monitoring,
                                                  file_system_poll_wait_seconds=0.3, **options))
    server.start()
    return server


@contextlib.contextmanager
def running(models: dict[str, pathlib.Path], **options):
    """`start`, stopped on leaving the block."""
    server = start(models, **options)
    try:
        yield server
    finally:
        server.stop(grace=1)


def http(port: int, path: str, body: bytes | dict | None = None, method: str | None = None,
         headers: dict | None = None) -> tuple[int, str, str]:
    """(status, content type, text) of one HTTP call; a dict body is sent as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()
