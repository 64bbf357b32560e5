"""REST calls for the benchmark: the same request as gRPC's, as TF Serving's JSON with b64 bytes."""

from __future__ import annotations

import base64
import http.client
import json
from typing import Callable


def rest_predict(address: str, model: str, signature: str, jpeg: bytes,
                 method: str | None = None) -> tuple[Callable[[], bytes], int]:
    """A zero-argument call of `signature` on one encoded image (explained with `method`, for a signature
    that takes one) over one kept-alive HTTP connection, and the request's size in bytes."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    instance = {"image_bytes": {"b64": base64.b64encode(jpeg).decode()}, "class_index": -1}
    if method:
        instance["method"] = method
    body = json.dumps({"signature_name": signature, "instances": [instance]}).encode()
    path = f"/v1/models/{model}:predict"

    def call() -> bytes:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST {path}: HTTP {response.status}: {data[:300]!r}")
        return data

    return call, len(body)
