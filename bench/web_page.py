"""python -m bench.web_page: the explain page's time from drop to overlay, in a real browser.

Starts the page (`client.web`) in this process against a running model server, opens it in
headless Chromium, picks one image `--runs` times and reads the page's own figures for each: the
time from the drop to the drawn overlay, split into server (the gRPC Predict call, timed by the
page's backend), network (browser to page and back) and page (reading the file, colouring and
drawing in the browser). Prints medians; `--screenshot` saves the page after the runs.

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`); nothing is
downloaded at run time.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import threading

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TIMINGS = ("totalMs", "serverMs", "networkMs", "pageMs")


def chromium(downloads: pathlib.Path | None = None, width: int = 1400, height: int = 900) -> webdriver.Chrome:
    """Headless Chromium driven by the system's chromedriver (Selenium Manager, which would download
    a driver, is never asked). `downloads`: where the page's download buttons save files."""
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def open_page(driver: webdriver.Chrome, url: str, method: str = "gradcam") -> None:
    """Load the page, wait until it knows the model's methods, choose `method` ("__compare__": all)."""
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#method option"))
    driver.execute_script("document.getElementById('method').value = arguments[0]", method)


def upload(driver: webdriver.Chrome, *paths: pathlib.Path | str) -> None:
    """Pick files with the page's file input: the same path in the page as a drop."""
    driver.find_element(By.ID, "files").send_keys("\n".join(str(pathlib.Path(p).resolve()) for p in paths))


def explained_panels(driver: webdriver.Chrome, rows: int, timeout: float = 120) -> list:
    """The panels of the first `rows` rows, once every one shows an overlay or an error."""
    def settled(d):
        found = d.find_elements(By.CSS_SELECTOR, ".row")
        if len(found) < rows:
            return False
        panels = [p for row in found[:rows] for p in row.find_elements(By.CSS_SELECTOR, ".panel")]
        done = all(p.get_attribute("data-class-index") or p.get_attribute("data-error") for p in panels)
        return panels if panels and done else False

    return WebDriverWait(driver, timeout).until(settled)


def main(argv: list[str] | None = None) -> int:
    from camserve.client import CamClient
    from camserve.client.web import ExplainPage, make_server

    parser = argparse.ArgumentParser(prog="python -m bench.web_page", description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="localhost:8500", help="gRPC address of the model server")
    parser.add_argument("--model", default="efficientnet_lite0_cam")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--image", default="samples/chelsea.png")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--screenshot", default="", help="save the page as this PNG after the runs")
    args = parser.parse_args(argv)

    with CamClient(args.server, model=args.model) as client:
        client.wait_until_ready(300)
        server = make_server(ExplainPage(client), port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        driver = chromium()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/"
            open_page(driver, url, args.method)
            figures: dict[str, list[float]] = {key: [] for key in TIMINGS}
            for run in range(args.runs):  # one at a time: each run is alone on the server
                upload(driver, args.image)
                panel = explained_panels(driver, run + 1)[-1]
                if panel.get_attribute("data-error"):
                    raise SystemExit(f"the page refused: {panel.get_attribute('data-error')}")
                for key in TIMINGS:
                    figures[key].append(float(panel.get_attribute(f"data-{key[:-2].lower()}-ms")))
            if args.screenshot:  # a fresh page comparing every method on the image
                open_page(driver, url, "__compare__")
                upload(driver, args.image)
                explained_panels(driver, 1)
                driver.save_screenshot(args.screenshot)
        finally:
            driver.quit()
            server.shutdown()
    medians = {key: statistics.median(values) for key, values in figures.items()}
    print(f"{args.image} by {args.method}, {args.runs} runs, medians: drop to overlay {medians['totalMs']:.1f} ms = "
          f"server {medians['serverMs']:.1f} + network {medians['networkMs']:.1f} + page {medians['pageMs']:.1f}")
    print("first run (cold page): " + ", ".join(f"{k[:-2]} {v[0]:.1f} ms" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
