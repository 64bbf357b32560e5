"""`python -m client web`: a page that explains the images you drop on it, in the browser.

The page's HTTP side is the standard library's. It forwards each image unchanged to the model
server over gRPC (CamClient), so it works with any server that hosts our SavedModel, TF Serving
included, and needs nothing on the server side. The browser (client/web.html) draws the server's
heatmap over the photo at the photo's size; this side only checks, forwards and times.

Limits, so that a page left open cannot exhaust the machine: the upload size (from Content-Length,
refused unread), the pixels the image declares (from its header, before anything decodes it) and
the explanations running at once (more get 429). It binds 127.0.0.1: the page has no login.
"""
from __future__ import annotations

import base64
import functools
import json
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import numpy as np

from .api import CamClient, CamServingError
from .image_header import DEFAULT_MAX_PIXELS, declared_size
from .outputs import HEATMAP_PNG, picture_name

PAGE = Path(__file__).with_name("web.html")
# What the browser may load: this page's own script and style, and images it makes itself. No CDN,
# no font, nothing from elsewhere: the page works offline.
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}


@dataclass(frozen=True)
class PageLimits:
    """What one request may bring. `max_pixels` defaults to the exporter's own limit, which reads it from here."""
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_concurrent: int = 4

    def __post_init__(self):
        if min(self.max_upload_bytes, self.max_pixels, self.max_concurrent) <= 0:
            raise ValueError(f"the page's limits must be positive: {self}")


class PageError(Exception):
    """A refusal the page shows in words: an HTTP status and a sentence."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class ExplainPage:
    """What the page asks for (the model's methods, one explanation), as JSON-ready dicts."""

    def __init__(self, client: CamClient, limits: PageLimits = PageLimits()):
        self.client, self.limits = client, limits
        self._slots = threading.BoundedSemaphore(limits.max_concurrent)
        self._methods: dict[str, list[str]] = {}  # each method and its pictures' outputs

    def model(self) -> dict:
        """The model's explain methods (from GetModelMetadata), the limits and the JET palette the
        browser colours maps with (OpenCV's, as the CLI's overlays)."""
        return {"model": self.client.model, "server": self.client.target, "methods": list(self._ask_methods()),
                "max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels,
                "jet": jet_palette()}

    def explain(self, image: bytes, method: str, class_index: int | None = None) -> dict:
        """One image explained by `method` (the top-1 class, or `class_index`): its top-k, the
        server's 8-bit heatmap PNG at model size and the method's pictures of its own, by name (base64),
        and how long the gRPC call took."""
        started = time.perf_counter()
        width, height = self.check(image)
        own = self._methods.get(method)  # its pictures' outputs
        if own is None:
            own = self._ask_methods().get(method)  # the model may have gained methods since the page asked
            if own is None:
                raise PageError(HTTPStatus.BAD_REQUEST, f"model {self.client.model!r} has no method {method!r}; "
                                f"it has {', '.join(self._methods)}")
        if not self._slots.acquire(blocking=False):
            raise PageError(HTTPStatus.TOO_MANY_REQUESTS, f"the page is busy: {self.limits.max_concurrent} "
                            "explanations are running already (--max-concurrent); try again in a moment")
        try:
            call = time.perf_counter()
            result = self._ask(lambda: self.client.explain(image, method=method, class_index=class_index,
                                                           heatmap="none", outputs=[HEATMAP_PNG, *own]))
            server_ms = (time.perf_counter() - call) * 1e3
        finally:
            self._slots.release()
        indices = result.outputs["top_k_indices"]
        return {
            "method": method, "class_index": result.class_index, "class_label": result.class_label,
            "score": result.score, "width": width, "height": height,
            "top_k": [{"index": int(i), "label": label, "probability": p}
                      for i, (label, p) in zip(indices, result.top_k)],
            "heatmap_png": _base64(result.outputs[HEATMAP_PNG]),
            "pictures": {picture_name(o): _base64(result.outputs[o]) for o in own},
            "server_ms": server_ms, "backend_ms": (time.perf_counter() - started) * 1e3,
        }

    def check(self, image: bytes) -> tuple[int, int]:
        """(width, height) the image declares, or a PageError for what the page refuses unseen."""
        if not image:
            raise PageError(HTTPStatus.BAD_REQUEST, "the file is empty")
        try:
            width, height = declared_size(image)
        except ValueError as err:
            raise PageError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the file is {err}") from None
        if width * height > self.limits.max_pixels:
            raise PageError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the image is {width}×{height} = {width * height / 1e6:.1f} million pixels, more than "
                            f"this page accepts ({self.limits.max_pixels / 1e6:.1f} million, --max-pixels)")
        return width, height

    def _ask_methods(self) -> dict[str, list[str]]:
        self._methods = self._ask(self.client.method_pictures)
        if not self._methods:
            raise PageError(HTTPStatus.NOT_FOUND, f"model {self.client.model!r} at {self.client.target} has no "
                            "explain signatures (<method>_bytes with a class_index input)")
        return self._methods

    def _ask(self, call):
        """`call()`, its gRPC failure turned into a sentence about the model server."""
        try:
            return call()
        except CamServingError as err:
            where = f"the model server at {self.client.target}"
            if err.code == grpc.StatusCode.UNAVAILABLE:
                message = f"{where} is unavailable ({err.details}). Is it running?"
            elif err.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                message = f"{where} did not answer in time ({err.details})"
            else:
                message = f"{where} refused: {err.details}"
            raise PageError(_HTTP_STATUS.get(err.code, HTTPStatus.BAD_GATEWAY), message[0].upper() + message[1:])


def _base64(png) -> str:
    return base64.b64encode(bytes(png)).decode("ascii")


@functools.cache
def jet_palette() -> list[int]:
    """OpenCV's COLORMAP_JET as 256 RGB triples, flattened (computed once)."""
    import cv2

    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    return bgr.reshape(-1).tolist()


class _Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /api/model, POST /api/explain?method=M[&class_index=N] (body: the image)."""

    server_version = "camserve-web"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may stay silent: a stalled upload does not hold a thread
    page: ExplainPage

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/":
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/api/model":
            self._answer(self.page.model)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/explain":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {url.path}"})
            return
        length = self.headers.get("Content-Length")
        limit = self.page.limits.max_upload_bytes
        if length is None or not length.isdigit():
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "send the image as the body, with a Content-Length"})
        elif int(length) > limit:
            self.close_connection = True  # the body is left unread
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"the file is {int(length) / 2**20:.1f} MB, more than this page accepts "
                                 f"({limit / 2**20:.1f} MB, --max-upload-mb)"})
        else:
            image = self.rfile.read(int(length))
            query = parse_qs(url.query)
            method = query.get("method", ["gradcam"])[0]
            class_index = query.get("class_index", [""])[0]
            if class_index and not class_index.isdigit():
                self._json(HTTPStatus.BAD_REQUEST,
                           {"error": f"class_index must be a class number, not {class_index!r}"})
                return
            self._answer(lambda: self.page.explain(image, method, int(class_index) if class_index else None))

    def _answer(self, produce) -> None:
        try:
            self._json(HTTPStatus.OK, produce())
        except PageError as err:
            self._json(err.status, {"error": str(err)})

    def _json(self, status: HTTPStatus, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-") -> None:
        if isinstance(code, int) and code >= 400:  # refusals are worth a line; successes are not
            super().log_request(code, size)


def make_server(page: ExplainPage, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """The page's HTTP server (port 0: any free port); run it with `serve_forever()`."""
    handler = type("Handler", (_Handler,), {"page": page})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
