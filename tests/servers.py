"""`python -m serving` in a subprocess, for the tests that need a real server process."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading

import psutil

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
