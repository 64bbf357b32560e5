"""The explain page (`python -m client web`): its HTTP side, and the page itself in headless Chromium
against the embedded server with the synthetic shapes model.

The browser's overlay is compared with the CLI's (client/overlay.py) for the same image and class:
the page colours and stretches the server's map itself, so it must draw the same picture.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import urllib.request

import cv2
import numpy as np
import pytest

import synthetic
from camserve.client import CamClient, overlay
from camserve.client.image_header import declared_size
from camserve.client.outputs import EXPLAIN
from camserve.client.web import PAGE, ExplainPage, PageError, PageLimits, make_server
from servers import ROOT, http, start

CHELSEA = ROOT / "samples" / "chelsea.png"


# -- image headers ------------------------------------------------------------------------------
def _encoded(extension: str, width: int, height: int, *flags) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(extension, image, list(flags))[1].tobytes()


@pytest.mark.parametrize("extension, flags", [(".png", ()), (".jpg", ()), (".bmp", ()),
                                              (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))])
def test_declared_size_reads_the_header(extension, flags):
    data = _encoded(extension, 37, 23, *flags)
    assert declared_size(data) == (37, 23)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[:2] == (23, 37)


def test_declared_size_of_a_top_down_bmp_and_of_what_it_cannot_read():
    bmp = bytearray(_encoded(".bmp", 5, 4))
    bmp[22:26] = (-4).to_bytes(4, "little", signed=True)  # rows stored top-down
    assert declared_size(bytes(bmp)) == (5, 4)
    with pytest.raises(ValueError, match="not a JPEG, PNG or BMP"):
        declared_size(b"GIF89a" + bytes(20))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        declared_size(_encoded(".jpg", 8, 8)[:20])


# -- the page's HTTP side -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(shapes_export):
    """The embedded server with the shapes model (every method), for the whole module."""
    server = start({"shapes": pathlib.Path(shapes_export).parent}, metrics=False)
    yield server
    server.stop(grace=1)


@contextlib.contextmanager
def page_on(grpc_port: int, limits: PageLimits = PageLimits()):
    """The page's server in a thread, talking to the model server on `grpc_port`; yields its port."""
    with CamClient(f"127.0.0.1:{grpc_port}", model="shapes", timeout=20) as client:
        server = make_server(ExplainPage(client, limits), port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def page(served):
    with page_on(served.port) as port:
        yield port


def _png(width: int, height: int) -> bytes:
    return cv2.imencode(".png", np.zeros((height, width), np.uint8))[1].tobytes()


def test_model_lists_the_methods_from_the_signatures(page):
    from camserve.export.methods import METHODS as EXPORTED

    status, _, text = http(page, "/api/model")
    assert status == 200, text
    body = json.loads(text)
    assert body["model"] == "shapes" and body["methods"] == sorted(EXPORTED)
    # the palette is OpenCV's JET, as the CLI's pictures
    jet = np.array(body["jet"], np.uint8).reshape(256, 3)
    assert np.array_equal(jet[:, ::-1], cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_JET)[0])


def test_explain_returns_the_servers_map_and_timing(page, served):
    status, _, text = http(page, "/api/explain?method=gradcam&class_index=1", CHELSEA.read_bytes())
    assert status == 200, text
    body = json.loads(text)
    with CamClient(f"127.0.0.1:{served.port}", model="shapes") as client:
        direct = client.explain(str(CHELSEA), method="gradcam", class_index=1)
    assert (body["width"], body["height"]) == (451, 300)
    assert body["class_index"] == 1 and [e["index"] for e in body["top_k"]][0] == direct.outputs["top_k_indices"][0]
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(body["heatmap_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(heat.astype(np.float32) / 255, direct.heatmap)
    assert 0 < body["server_ms"] <= body["backend_ms"]
    assert body["pictures"] == {}


def test_guided_gradcam_also_returns_its_picture(page, served):
    status, _, text = http(page, "/api/explain?method=guided_gradcam", CHELSEA.read_bytes())
    assert status == 200, text
    with CamClient(f"127.0.0.1:{served.port}", model="shapes") as client:
        own = client.method_pictures()["guided_gradcam"]
        direct = client.explain(str(CHELSEA), method="guided_gradcam", outputs=own)
    assert own == ["guided_png_bytes"] and list(json.loads(text)["pictures"]) == list(direct.pictures) == ["guided"]
    png = base64.b64decode(json.loads(text)["pictures"]["guided"])
    guided = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(guided[:, :, ::-1], direct.pictures["guided"]) and guided.shape == (64, 64, 3)


REFUSALS = {  # what the page answers, before the model server or from it
    "not an image": ("/api/explain", b"GIF89a" + bytes(40), 415, "not a JPEG, PNG or BMP image"),
    "empty": ("/api/explain", b"", 400, "the file is empty"),
    "too many pixels": (
        "/api/explain",
        _png(6000, 5000),
        413,
        "6000×5000 = 30.0 million pixels, more than this page accepts",
    ),
    "unknown method": (
        "/api/explain?method=nope",
        _png(8, 8),
        400,
        "has no method 'nope'; it has ",  # the model's methods, as /api/model lists them
    ),
    "class not a number": ("/api/explain?class_index=x", _png(8, 8), 400, "class_index must be a class number"),
    "class out of range": (
        "/api/explain?class_index=7",
        _png(8, 8),
        400,
        "refused: assertion failed: class_index 7 is out of range: this model has 3 classes",
    ),
    "unknown path": ("/api/other", b"x", 404, "nothing at /api/other"),
}


@pytest.mark.parametrize("path, body, status, message", REFUSALS.values(), ids=REFUSALS)
def test_refusals_are_sentences(page, path, body, status, message):
    got, content_type, text = http(page, path, body)
    assert (got, content_type) == (status, "application/json"), text
    assert message in json.loads(text)["error"]


def test_a_body_over_the_limit_is_refused_unread(served):
    with page_on(served.port, PageLimits(max_upload_bytes=1000)) as port:
        status, _, text = http(port, "/api/explain", bytes(5000))
    assert status == 413 and "more than this page accepts (0.0 MB, --max-upload-mb)" in json.loads(text)["error"]


def test_explanations_past_the_concurrency_cap_get_429(served):
    with CamClient(f"127.0.0.1:{served.port}", model="shapes") as client:
        page = ExplainPage(client, PageLimits(max_concurrent=1))
        page.model()
        page._slots.acquire()  # one explanation running
        with pytest.raises(PageError, match="the page is busy: 1 explanations are running") as refused:
            page.explain(CHELSEA.read_bytes(), "gradcam")
        assert refused.value.status == 429
        page._slots.release()
        assert page.explain(CHELSEA.read_bytes(), "gradcam")["class_index"] >= 0


def test_the_page_loads_nothing_from_elsewhere(page):
    status, _, html = http(page, "/")
    assert status == 200
    assert not re.findall(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", html), "the page must work offline"
    assert not re.findall(r"https?://", PAGE.read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{page}/", timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'none'") and "connect-src 'self'" in policy


def test_cli_binds_localhost_and_says_when_the_model_server_is_down(tmp_path):
    """`python -m client web` against a port where nothing listens: the page still opens and says why."""
    run = subprocess.Popen(
        [sys.executable, "-m", "client", "web", "--server", "127.0.0.1:9", "--port", "0", "--model", "shapes",
         "--timeout", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = run.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, line + run.stderr.read()
        port = int(found[1])
        status, _, _ = http(port, "/")
        assert status == 200
        status, _, text = http(port, "/api/model")
        assert status == 503
        assert "The model server at 127.0.0.1:9 is unavailable" in json.loads(text)["error"]
    finally:
        run.terminate()
    assert run.wait(10) == 0  # SIGTERM stops it cleanly


def test_import_client_does_not_load_the_page():
    code = "import sys, client; print(sorted(m for m in ('client.web', 'http.server') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "[]", run.stderr


# -- in the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from camserve.bench.web_page import CHROMEDRIVER, CHROMIUM, chromium

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        message = f"no {' or '.join(missing)}: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CAMSERVE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    downloads = tmp_path_factory.mktemp("downloads")
    driver = chromium(downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


def _open(browser, port: int, method: str = "gradcam") -> None:
    from camserve.bench.web_page import open_page

    open_page(browser, f"http://127.0.0.1:{port}/", method)


def _explain(browser, path) -> list:
    """Pick one file; the panels of its row once each shows an overlay or an error."""
    from camserve.bench.web_page import explained_panels, upload

    before = len(browser.find_elements("css selector", ".row"))
    upload(browser, path)
    explained_panels(browser, before + 1)
    return browser.find_elements("css selector", ".row")[before].find_elements("css selector", ".panel")


def _pixels(browser, canvas) -> np.ndarray:
    """A canvas's pixels as BGR uint8, through its PNG."""
    url = browser.execute_script("return arguments[0].toDataURL('image/png')", canvas)
    return cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)


def _reference(served, path, class_index=None, alpha=0.4) -> np.ndarray:
    """The CLI's overlay of the same image and class."""
    with CamClient(f"127.0.0.1:{served.port}", model="shapes") as client:
        explained = client.explain(str(path), method="gradcam", class_index=class_index)
    return overlay.overlay(overlay.read_image(path), explained.heatmap, alpha)


def _assert_same_picture(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to the browser's bilinear stretch and 8-bit blending, which differ from OpenCV's by a
    level or two (measured: mean 0.6-0.8, 99th percentile 3-4, max 8 of 255). An overlay of another
    class or opacity is tens of levels away."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < 1.2 and np.percentile(diff, 99) <= 6, (diff.mean(), np.percentile(diff, 99))


def test_uploaded_image_gets_an_overlay_of_its_own_size(browser, page, served):
    _open(browser, page)
    [panel] = _explain(browser, CHELSEA)
    assert not panel.get_attribute("data-error")
    canvas = panel.find_element("css selector", "canvas")
    size = browser.execute_script("return [arguments[0].width, arguments[0].height]", canvas)
    assert size == [451, 300]
    _assert_same_picture(_pixels(browser, canvas), _reference(served, CHELSEA))
    assert float(panel.get_attribute("data-total-ms")) >= float(panel.get_attribute("data-server-ms")) > 0
    # the opacity slider: 0 shows the photo alone
    row = browser.find_elements("css selector", ".row")[-1]
    slider = row.find_element("css selector", ".opacity")
    browser.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert np.array_equal(_pixels(browser, canvas), overlay.read_image(CHELSEA))


def test_guided_gradcam_shows_its_picture_under_the_overlay(browser, page):
    _open(browser, page, "guided_gradcam")
    [panel] = _explain(browser, CHELSEA)
    assert not panel.get_attribute("data-error")
    picture = panel.find_element("css selector", "img.picture[data-picture='guided']")
    browser.execute_script("return arguments[0].decode()", picture)
    assert picture.is_displayed()
    assert browser.execute_script("return [arguments[0].width, arguments[0].naturalWidth]", picture) == [451, 64]


def test_other_methods_show_no_picture_under_the_overlay(browser, page):
    """Only a method whose answer has a picture shows one: no empty picture frame under Grad-CAM's overlay."""
    _open(browser, page)
    [panel] = _explain(browser, CHELSEA)
    assert not panel.find_elements("css selector", "img.picture")


def test_downloads_are_the_overlay_and_the_heatmap_at_the_image_size(browser, page):
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, page)
    [panel] = _explain(browser, CHELSEA)
    for what in ("overlay", "heatmap"):
        panel.find_element("css selector", f"button[data-download='{what}']").click()
        path = browser.downloads / f"chelsea_gradcam_{what}.png"
        WebDriverWait(browser, 20).until(lambda _: path.exists() and path.stat().st_size > 0)
        assert cv2.imread(str(path)).shape == (300, 451, 3)


def test_clicking_the_second_label_explains_that_class(browser, page, served, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    image, _ = synthetic.draw("cross", np.random.default_rng(5))
    path = tmp_path / "cross.png"
    overlay.write_png(path, cv2.resize(image, (200, 150), interpolation=cv2.INTER_NEAREST)[:, :, ::-1])
    _open(browser, page)
    [panel] = _explain(browser, path)
    row = browser.find_elements("css selector", ".row")[-1]
    labels = row.find_elements("css selector", ".labels button")
    first, second = (int(b.get_attribute("data-index")) for b in labels[:2])
    assert int(panel.get_attribute("data-class-index")) == first
    before = _pixels(browser, panel.find_element("css selector", "canvas"))

    labels[1].click()
    WebDriverWait(browser, 60).until(lambda _: panel.get_attribute("data-class-index") == str(second))
    after = _pixels(browser, panel.find_element("css selector", "canvas"))
    assert second != first and not np.array_equal(before, after)
    want = _reference(served, path, class_index=second)
    _assert_same_picture(after, want)
    with pytest.raises(AssertionError):  # the comparison tells the two classes apart
        _assert_same_picture(before, want)
    explained = row.find_elements("css selector", ".labels button.explained")
    assert [int(b.get_attribute("data-index")) for b in explained] == [second]


def test_compare_all_shows_every_method(browser, page):
    _open(browser, page, "__compare__")
    panels = _explain(browser, CHELSEA)
    methods = [p.get_attribute("data-method") for p in panels]
    from camserve.export.methods import METHODS as EXPORTED

    assert sorted(methods) == sorted(EXPORTED)
    assert all(p.get_attribute("data-class-index") for p in panels)


@pytest.mark.parametrize(
    "limit, refusal",
    [
        (PageLimits().max_pixels, "more than this page accepts (25.0 million, --max-pixels)"),
        (10**9, "the image declares 6000x5000 pixels, more than the limit of 25000000 pixels"),  # the server's own
    ],
)
def test_an_oversized_image_is_refused_in_words(browser, served, tmp_path, limit, refusal):
    path = tmp_path / "huge.png"
    path.write_bytes(_png(6000, 5000))
    with page_on(served.port, PageLimits(max_pixels=limit)) as port:
        _open(browser, port)
        [panel] = _explain(browser, path)
        assert refusal in panel.get_attribute("data-error")
        assert refusal in panel.find_element("css selector", ".error").text
        assert not panel.find_element("css selector", "canvas").is_displayed()  # no empty picture beside it


def test_a_stopped_server_is_reported_unavailable(browser, tmp_path):
    # A server of its own, to stop: the tiny model (under the name the page asks for) loads in seconds.
    server = start({"shapes": synthetic.export_tiny(tmp_path / "shapes").parent}, metrics=False)
    with page_on(server.port) as port:
        _open(browser, port)  # the page has learnt the model's methods
        server.stop(grace=1)
        [panel] = _explain(browser, CHELSEA)
        text = panel.find_element("css selector", ".error").text
    assert re.search(rf"The model server at 127\.0\.0\.1:{server.port} is unavailable .*Is it running\?", text), text


# -- the warm-up covers what the client, the CLI and the page send --------------------------------
def test_every_default_call_of_client_cli_and_page_was_warmed_up(served, page, shapes_export, monkeypatch, tmp_path):
    """TF Serving builds an executor per (signature's tensors, fetched outputs) at its first call: each
    call that CamClient, `python -m client` and the page make by default must find its executor built
    by a warm-up record (the same signature, or the one whose tensors an alias runs, and the same outputs)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from camserve.client.__main__ import main as cli
    from camserve.serving.servables.session import SavedModelSession
    from camserve.serving.servables.warmup import WARMUP_FILE

    sent = []
    original = CamClient._call

    def recording(self, method, request, what, *args, **kwargs):
        if hasattr(request, "output_filter"):
            sent.append((request.model_spec.signature_name, frozenset(request.output_filter)))
        return original(self, method, request, what, *args, **kwargs)

    monkeypatch.setattr(CamClient, "_call", recording)
    image = cv2.cvtColor(cv2.resize(cv2.imread(str(CHELSEA)), (64, 64)), cv2.COLOR_BGR2RGB)
    with CamClient(f"127.0.0.1:{served.port}", model="shapes") as client:
        methods = client.explain_methods()
        for method in methods:
            client.explain(str(CHELSEA), method=method)
            client.explain(image, method=method)
        client.predict(str(CHELSEA))
        client.predict(image)
    for method in methods:
        assert http(page, f"/api/explain?method={method}", CHELSEA.read_bytes())[0] == 200, method
        assert cli(["explain", str(CHELSEA), "--server", f"127.0.0.1:{served.port}", "--model", "shapes",
                    "--method", method, "--out", str(tmp_path)]) == 0, method
    assert cli(["predict", str(CHELSEA), "--server", f"127.0.0.1:{served.port}", "--model", "shapes"]) == 0
    # Every call, of every method or a prediction, file or array: one signature with one output set.
    assert set(sent) == {("explain_bytes", frozenset([*EXPLAIN, "guided_png_bytes"]))}

    with SavedModelSession(shapes_export) as session:  # which tensors each signature runs
        defs = session.signature_defs
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request
               for r in tf.data.TFRecordDataset(str(shapes_export / WARMUP_FILE))]

    def executor(signature: str, outputs: frozenset) -> tuple:
        outputs = outputs or frozenset(defs[signature].outputs)
        return (frozenset(i.name for i in defs[signature].inputs.values()),
                frozenset(defs[signature].outputs[o].name for o in outputs))

    warmed = {executor(r.model_spec.signature_name, frozenset(r.output_filter)) for r in records}
    unwarmed = {call for call in set(sent) if executor(*call) not in warmed}
    assert not unwarmed
