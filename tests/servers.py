"""Servers for the tests: `python -m serving` in a subprocess (`ServerProcess`), for the tests that
need a real server process, or an in-process EmbeddedServer on free ports (`start`, `running`), and
plain HTTP calls to its REST port."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import psutil

from camserve.serving import configs
from camserve.serving.server import EmbeddedServer, ServerOptions

ROOT = pathlib.Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m serving` in a subprocess; stderr collected; `rss()` in bytes."""

    def __init__(self, args: list[str], env: dict | None = None):
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "serving", *args], cwd=ROOT, env=full_env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.address: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"Running gRPC ModelServer at (\S+):(\d+)", line)
            if found:
                self.address = f"{found[1]}:{found[2]}"
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 120) -> str:
        self._ready.wait(timeout)
        if self.address is None:
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))
        return self.address

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    server = EmbeddedServer(
        config,
        ServerOptions(
            port=0, rest_api_port=free_port(), monitoring=monitoring, file_system_poll_wait_seconds=0.3, **options
        ),
    )
    server.start()
    return server


def from_flags(*flags: str) -> EmbeddedServer:
    """An EmbeddedServer built from `python -m serving`'s flags as its command line builds it (not started)."""
    from camserve.serving.__main__ import options_from_args, parser

    p = parser()
    return EmbeddedServer(*options_from_args(p.parse_args(list(flags)), p))


@contextlib.contextmanager
def running(models: dict[str, pathlib.Path], **options):
    """`start`, stopped on leaving the block."""
    server = start(models, **options)
    try:
        yield server
    finally:
        server.stop(grace=1)


def http(
    port: int, path: str, body: bytes | dict | None = None, method: str | None = None, headers: dict | None = None
) -> tuple[int, str, str]:
    """(status, content type, text) of one HTTP call; a dict body is sent as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()
