"""`walt serve` in a real browser: the command serves a tiny model on the CPU, headless Chromium (driven by
Playwright) fills the form, presses Generate and gets a playable video and its MP4; a bad value shows its
message in the page and the server goes on serving.

Needs Playwright (the ``browser`` extra) and a Chromium: Debian's ``chromium`` package (``make browser``
installs both), a Chrome named by ``WALT_CHROMIUM``, or Playwright's own download. Skipped otherwise.
``WALT_SCREENSHOT=docs/walt_serve.png`` also saves a picture of the page after its generation.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._tiny_models import write_tiny_model

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
VIDEO = "#walt-video video"


def _chromium() -> str | None:
    """A Chromium or Chrome executable: $WALT_CHROMIUM, one on the PATH, or Playwright's own download."""
    if os.environ.get("WALT_CHROMIUM"):
        return os.environ["WALT_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        bundled = p.chromium.executable_path
    return bundled if Path(bundled).is_file() else None


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("gradio", reason="walt serve needs Gradio: pip install -e '.[serve]'")
    pytest.importorskip(
        "playwright.sync_api",
        reason="Playwright is not installed: make browser (pip install -e '.[browser]')",
    )
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium: make browser installs Debian's chromium package (or set WALT_CHROMIUM)")
    return executable


@pytest.fixture(scope="module")
def server(tmp_path_factory, chromium) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`walt serve` of a tiny class-conditional model on the CPU, in its own process, on a free port: started
    here, waited for by ``served`` (the browser starts meanwhile)."""
    folder = tmp_path_factory.mktemp("serve")
    model = write_tiny_model(folder / "model")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "walt", "serve", "--model", str(model), "--device", "cpu",
               "--port", str(port)]  # fmt: skip
    with (folder / "serve.log").open("w") as log:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}/", process, folder / "serve.log"
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def served(server, browser) -> str:
    url, process, log = server
    _wait_until_serving(url, process, log)
    return url


def test_the_page_generates_a_playable_video_and_offers_its_mp4(served, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 820})
    elsewhere = []  # the page must work offline (clusters): nothing fetched from another host
    page.on(
        "request", lambda r: None if r.url.startswith((served, "data:", "blob:")) else elsewhere.append(r.url)
    )
    page.goto(served)
    page.locator("#walt-class input").click()
    page.get_by_role("option", name="red circle moving right").click()
    page.locator("#walt-steps input").fill("2")
    page.locator("#walt-seed input").fill("7")
    page.locator("#walt-generate").click()
    # playable: the browser has read the file's header (readyState >= HAVE_METADATA) and knows its length
    page.wait_for_function(
        f"() => {{ const v = document.querySelector('{VIDEO}'); return v && v.readyState >= 1 && v.duration > 0; }}",
        timeout=120_000,
    )
    src, width, height = page.evaluate(
        f"() => {{ const v = document.querySelector('{VIDEO}'); return [v.src, v.videoWidth, v.videoHeight]; }}"
    )
    assert (width, height) == (32, 32) and src.endswith("walt_red_circle_moving_right_seed7.mp4")
    mp4 = page.request.get(src).body()
    assert mp4[4:8] == b"ftyp"
    (tmp_path / "served.mp4").write_bytes(mp4)
    from walt.data import read_video

    assert read_video(tmp_path / "served.mp4").shape == (17, 32, 32, 3)
    download = page.locator("#walt-mp4 a[download]")
    assert download.get_attribute("download") == "walt_red_circle_moving_right_seed7.mp4"
    assert page.request.get(download.get_attribute("href")).body() == mp4
    assert "class 'red circle moving right', seed 7, 2 ddim steps" in page.locator("#walt-made").inner_text()
    assert not elsewhere
    if os.environ.get("WALT_SCREENSHOT"):
        page.wait_for_timeout(1500)  # a few frames into the loop
        page.screenshot(path=os.environ["WALT_SCREENSHOT"], full_page=True)
    page.close()


def test_a_bad_value_shows_its_message_and_the_server_goes_on(served, browser):
    page = browser.new_page()
    page.goto(served)
    page.locator("#walt-steps input").fill("0")
    page.locator("#walt-generate").click()
    message = page.get_by_text("steps must be a whole number from 1 to 1000, got 0")
    message.first.wait_for(timeout=60_000)
    assert "Traceback" not in page.content()
    page.locator("#walt-steps input").fill("1")
    page.locator("#walt-seed input").fill("3")
    page.locator("#walt-generate").click()
    page.wait_for_function(
        f"() => {{ const v = document.querySelector('{VIDEO}'); return v && v.src.endsWith('_seed3.mp4') && v.readyState >= 1; }}",
        timeout=120_000,
    )
    page.close()


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            pytest.fail(f"walt serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"walt serve did not answer within {timeout:.0f} s:\n{log.read_text()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
